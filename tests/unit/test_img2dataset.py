"""img2dataset's output folder as input: lf-shards validates it in place, lf-precompute reads it."""

import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from data_pipelines.raw.format import decode_raw_sample
from data_pipelines.shards.tar_writer import open_tar_writer
from lf_common.errors import CorruptSampleError
from tests.conftest import compose_config
from trainer.cli.shards import run_shards


def jpeg(color, size=(40, 24)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="JPEG")
    return buffer.getvalue()


def img2dataset_meta(key: str, status: str = "success", error: str | None = None) -> dict:
    """A KEY.json as img2dataset writes it."""
    ok = status == "success"
    return {
        "url": f"https://example.com/{key}.jpg",
        "caption": f"photo {key}",
        "key": key,
        "status": status,
        "error_message": error,
        "width": 40 if ok else None,
        "height": 24 if ok else None,
        "original_width": 400 if ok else None,
        "original_height": 240 if ok else None,
        "exif": "{}",
        "sha256": "ab" * 32 if ok else None,
    }


def make_img2dataset_folder(folder, shards=2, per_shard=3, failed_in_tar=True):
    """img2dataset's layout: NNNNN.tar (successes), NNNNN.parquet (every URL tried), NNNNN_stats.json."""
    folder.mkdir(parents=True, exist_ok=True)
    for shard in range(shards):
        rows = []
        with open_tar_writer(folder / f"{shard:05d}.tar") as writer:
            for i in range(per_shard):
                key = f"{shard:05d}{i:04d}"
                meta = img2dataset_meta(key)
                writer.write(
                    {
                        "__key__": key,
                        "jpg": jpeg((40 * i, 80, 120)),
                        "txt": meta["caption"].encode(),
                        "json": json.dumps(meta).encode(),
                    }
                )
                rows.append(meta)
            if failed_in_tar and shard == 0:  # a failed sample that made it into the tar, without image
                meta = img2dataset_meta("000000099", "failed_to_resize", "image too small")
                writer.write({"__key__": "000000099", "txt": b"broken", "json": json.dumps(meta).encode()})
        for i in range(2):  # URLs that failed: only in the parquet, as img2dataset does
            rows.append(img2dataset_meta(f"{shard:05d}{50 + i:04d}", "failed_to_download", "HTTP 404"))
        pq.write_table(pa.Table.from_pylist(rows), folder / f"{shard:05d}.parquet")
        stats = {"count": len(rows), "successes": per_shard, "failed_to_download": 2, "failed_to_resize": 0}
        (folder / f"{shard:05d}_stats.json").write_text(json.dumps(stats))
    return folder


def test_lf_shards_validates_img2dataset_output_in_place(tmp_path):
    folder = make_img2dataset_folder(tmp_path / "i2d")
    before = {p.name: p.read_bytes() for p in folder.glob("*.tar")}
    summary = run_shards(compose_config("shards", ["source=img2dataset", f"source.path={folder}"]))
    assert {p.name: p.read_bytes() for p in folder.glob("*.tar")} == before, "shards are not rewritten"
    assert summary["samples"] == 7 and len(summary["shards"]) == 2
    assert summary["status_counts"] == {"failed_to_download": 4, "success": 6}
    assert summary["failed_examples"][0]["error_message"] == "HTTP 404"
    first = summary["reports"][0]
    assert (first["missing_image"], first["failed_status"], first["ok"]) == (["000000099"], ["000000099"], False)
    assert summary["reports"][1]["ok"] and not summary["ok"]
    assert json.loads((folder / "img2dataset_summary.json").read_text())["samples"] == 7


def test_clean_img2dataset_folder_is_ok_and_summary_goes_to_out_dir(tmp_path):
    folder = make_img2dataset_folder(tmp_path / "i2d", failed_in_tar=False)
    summary = run_shards(
        compose_config("shards", ["source=img2dataset", f"source.path={folder}", f"out_dir={tmp_path / 'o'}"])
    )
    assert summary["ok"] and summary["samples"] == 6
    assert (tmp_path / "o" / "img2dataset_summary.json").is_file()


def test_img2dataset_samples_decode_and_failed_status_is_named(tmp_path):
    meta = img2dataset_meta("000000001")
    sample = {"__key__": "000000001", "__url__": "00000.tar", "jpg": jpeg((1, 2, 3)), "txt": b"c"}
    key, image, caption, decoded = decode_raw_sample({**sample, "json": json.dumps(meta).encode()})
    assert (key, caption, image.size, decoded["original_width"]) == ("000000001", "c", (40, 24), 400)
    failed = json.dumps(img2dataset_meta("000000001", "failed_to_resize", "too small")).encode()
    with pytest.raises(CorruptSampleError, match=r"00000\.tar: sample 000000001: .*'failed_to_resize' \(too small\)"):
        decode_raw_sample({**sample, "json": failed})


@pytest.mark.slow
def test_lf_precompute_takes_an_img2dataset_folder(pretrained_dir, tmp_path):
    from data_pipelines.latents.format import LatentManifest
    from trainer.cli.precompute import run_precompute

    folder = make_img2dataset_folder(tmp_path / "i2d")
    overrides = [f"shards={folder}", f"out_dir={tmp_path / 'latents'}", f"pretrained={pretrained_dir}"]
    manifest = run_precompute(compose_config("precompute", [*overrides, "resolution=32", "batch_size=4"]))
    assert [(s["name"], s["num_samples"], s["skipped"]) for s in manifest["shards"]] == [
        ("00000.tar", 3, 1),  # the failed sample is skipped and counted
        ("00001.tar", 3, 0),
    ]
    assert LatentManifest.load(tmp_path / "latents").num_samples == 6
