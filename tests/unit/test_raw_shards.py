import hashlib
import io
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from data_pipelines.raw.format import decode_raw_sample
from data_pipelines.raw.sources.base import SourceItem
from data_pipelines.raw.sources.caption_table import CaptionTableSource
from data_pipelines.raw.sources.digits import DigitsSource, digits_split
from data_pipelines.raw.sources.image_folder import ImageFolderSource
from data_pipelines.raw.writer import SUMMARY_NAME, write_raw_shards
from lf_common.errors import CorruptSampleError, DataError
from tests.conftest import FirstDigits


def read_samples(folder):
    urls = sorted(str(p) for p in folder.glob("*.tar"))
    return [decode_raw_sample(s) for s in wds.DataPipeline(wds.SimpleShardList(urls), wds.tarfile_to_samples())]


def save_image(path, color=(200, 30, 30), size=(40, 30), fmt=None):
    Image.new("RGB", size, color).save(path, format=fmt)


def test_digits_round_trip_in_img2dataset_layout(tmp_path):
    summary = write_raw_shards(FirstDigits(25), tmp_path, samples_per_shard=10)
    assert summary.samples == 25 and len(summary.shards) == 3
    assert json.loads((tmp_path / SUMMARY_NAME).read_text())["samples"] == 25
    members = wds.DataPipeline(wds.SimpleShardList(summary.shards[:1]), wds.tarfile_to_samples())
    first = next(iter(members))
    assert {"png", "txt", "json"} <= set(first)
    samples = read_samples(tmp_path)
    assert [s[0] for s in samples] == [f"{i:09d}" for i in range(25)]
    _, labels, indices = digits_split("train")
    _, image, caption, meta = samples[3]
    assert image.size == (32, 32)
    assert meta["index"] == int(indices[3]) and meta["label"] == int(labels[3])
    assert caption.startswith("a handwritten digit ")


def test_digits_heldout_split_is_every_fifth():
    _, _, train = digits_split("train")
    _, _, heldout = digits_split("heldout")
    assert len(train) + len(heldout) == 1797
    assert set(heldout) == set(range(0, 1797, 5))
    assert not set(train) & set(heldout)


def test_same_source_gives_byte_identical_shards(tmp_path):
    first = write_raw_shards(FirstDigits(12), tmp_path / "a", samples_per_shard=5)
    second = write_raw_shards(FirstDigits(12), tmp_path / "b", samples_per_shard=5)

    def digests(paths):
        return [hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in paths]

    assert digests(first.shards) == digests(second.shards)


def test_image_folder_with_captions(tmp_path):
    photos = tmp_path / "photos"
    (photos / "sub").mkdir(parents=True)
    save_image(photos / "b.png")
    (photos / "b.txt").write_text("a red square\n")
    save_image(photos / "sub" / "a.jpg", color=(0, 0, 255))
    (photos / "sub" / "a.txt").write_text("a blue square")
    save_image(photos / "c.bmp", color=(0, 255, 0), fmt="BMP")
    (photos / "c.txt").write_text("a green square")
    summary = write_raw_shards(ImageFolderSource(str(photos)), tmp_path / "shards")
    samples = read_samples(tmp_path / "shards")
    assert summary.samples == 3
    assert [s[2] for s in samples] == ["a red square", "a green square", "a blue square"]
    assert samples[2][3]["source_path"] == "sub/a.jpg"
    members = next(iter(wds.DataPipeline(wds.SimpleShardList(summary.shards), wds.tarfile_to_samples())))
    assert "png" in members  # BMP and PNG are stored as PNG, JPEG stays JPEG


def test_missing_caption_names_the_image(tmp_path):
    save_image(tmp_path / "lonely.png")
    with pytest.raises(DataError, match=r"lonely\.png: caption file lonely\.txt is missing"):
        write_raw_shards(ImageFolderSource(str(tmp_path)), tmp_path / "out")
    summary = write_raw_shards(ImageFolderSource(str(tmp_path), missing_caption="empty"), tmp_path / "out2")
    assert summary.samples == 1


def test_empty_or_missing_folder_is_named(tmp_path):
    with pytest.raises(DataError, match=r"no images found"):
        list(ImageFolderSource(str(tmp_path)))
    with pytest.raises(DataError, match=r"nowhere: image folder does not exist"):
        list(ImageFolderSource(str(tmp_path / "nowhere")))


def test_undecodable_image_errors_or_is_skipped_and_counted(tmp_path, caplog):
    (tmp_path / "good.png").write_bytes(_png_bytes())
    (tmp_path / "good.txt").write_text("good")
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    (tmp_path / "broken.txt").write_text("broken")
    with pytest.raises(CorruptSampleError, match=r"broken\.jpg: does not decode as an image"):
        write_raw_shards(ImageFolderSource(str(tmp_path)), tmp_path / "out")
    assert not list((tmp_path / "out").glob("*.tar*")), "a failed run leaves no shard, whole or partial"
    with caplog.at_level(logging.WARNING):
        summary = write_raw_shards(ImageFolderSource(str(tmp_path)), tmp_path / "out", on_bad_sample="skip")
    assert summary.samples == 1 and summary.skipped == 1
    assert summary.skipped_origins == [str(tmp_path / "broken.jpg")]
    assert "broken.jpg" in caplog.text


def test_existing_shards_are_not_mixed_with_new_ones(tmp_path):
    write_raw_shards(FirstDigits(4), tmp_path, samples_per_shard=2)
    with pytest.raises(DataError, match="already holds 2 shard"):
        write_raw_shards(FirstDigits(2), tmp_path, samples_per_shard=2)
    summary = write_raw_shards(FirstDigits(2), tmp_path, samples_per_shard=2, overwrite=True)
    assert len(list(tmp_path.glob("*.tar"))) == 1 and summary.samples == 2


def test_crash_mid_shard_leaves_only_complete_shards(tmp_path):
    def crashing_source():
        yield from FirstDigits(3)
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        write_raw_shards(crashing_source(), tmp_path, samples_per_shard=2)
    assert [p.name for p in tmp_path.iterdir()] == ["shard-000000.tar"]
    assert len(read_samples(tmp_path)) == 2


def test_caption_table_csv_and_jsonl(tmp_path):
    save_image(tmp_path / "x.png")
    (tmp_path / "table.csv").write_text("path,caption,score\nx.png,a red thing,0.9\n")
    summary = write_raw_shards(CaptionTableSource(str(tmp_path / "table.csv")), tmp_path / "csv")
    assert summary.samples == 1
    _, _, caption, meta = read_samples(tmp_path / "csv")[0]
    assert caption == "a red thing" and meta == {"source_path": "x.png", "score": "0.9"}
    (tmp_path / "table.jsonl").write_text(json.dumps({"file": str(tmp_path / "x.png"), "text": "json caption"}) + "\n")
    source = CaptionTableSource(str(tmp_path / "table.jsonl"), path_column="file", caption_column="text")
    assert write_raw_shards(source, tmp_path / "jsonl").samples == 1


def test_caption_table_errors_name_file_line_and_key(tmp_path):
    (tmp_path / "t.csv").write_text("path,text\nx.png,hello\n")
    with pytest.raises(DataError, match=r"t\.csv:2: key 'caption' is missing"):
        list(CaptionTableSource(str(tmp_path / "t.csv")))
    (tmp_path / "u.csv").write_text("path,caption\nmissing.png,hello\n")
    with pytest.raises(DataError, match=r"u\.csv:2: image file .*missing\.png does not exist"):
        list(CaptionTableSource(str(tmp_path / "u.csv")))
    with pytest.raises(DataError, match=r"absent\.csv: caption table does not exist"):
        list(CaptionTableSource(str(tmp_path / "absent.csv")))


def test_source_items_keep_jpeg_bytes_unchanged(tmp_path):
    data = _png_bytes(fmt="JPEG")
    item = SourceItem("mem.jpg", data, "caption")
    write_raw_shards([item], tmp_path)
    raw = next(
        iter(wds.DataPipeline(wds.SimpleShardList([str(tmp_path / "shard-000000.tar")]), wds.tarfile_to_samples()))
    )
    assert raw["jpg"] == data


def test_digits_source_images_hold_the_digit():
    item = next(iter(DigitsSource("train", size=32)))
    pixels = np.asarray(Image.open(io.BytesIO(item.image_bytes)))
    assert pixels.shape == (32, 32, 3) and pixels.max() > 200 and pixels.min() == 0


def _png_bytes(fmt="PNG"):
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (10, 200, 10)).save(buffer, format=fmt)
    return buffer.getvalue()


def test_parallel_workers_write_the_same_shards(tmp_path):
    one = write_raw_shards(FirstDigits(40), tmp_path / "one", samples_per_shard=16)
    two = write_raw_shards(FirstDigits(40), tmp_path / "two", samples_per_shard=16, workers=2)
    assert [Path(p).read_bytes() for p in one.shards] == [Path(p).read_bytes() for p in two.shards]


def test_parallel_workers_still_name_a_bad_image(tmp_path):
    (tmp_path / "a.png").write_bytes(_png_bytes())
    (tmp_path / "a.txt").write_text("a")
    (tmp_path / "b.png").write_bytes(b"not a png")
    (tmp_path / "b.txt").write_text("b")
    with pytest.raises(CorruptSampleError, match=r"b\.png: does not decode"):
        write_raw_shards(ImageFolderSource(str(tmp_path)), tmp_path / "out", workers=2)


def test_bytes_per_shard_limit(tmp_path):
    summary = write_raw_shards(FirstDigits(30), tmp_path, samples_per_shard=1000, max_bytes_per_shard=20_000)
    sizes = [Path(p).stat().st_size for p in summary.shards]
    assert len(sizes) > 1 and summary.samples == 30
    assert all(size < 20_000 + 10_240 + 4096 for size in sizes)  # one sample and the tar's end padding over
