"""lf-shards from a Parquet table: paths or image bytes, configurable columns, read in row batches."""

import io

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from PIL import Image

from data_pipelines.raw.format import decode_raw_sample
from data_pipelines.raw.sources.caption_table import CaptionTableSource
from data_pipelines.raw.writer import write_raw_shards
from lf_common.errors import DataError
from tests.conftest import compose_config
from trainer.cli.shards import run_shards


def png(color: tuple[int, int, int], size=(12, 9)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def read_back(folder):
    urls = sorted(str(p) for p in folder.glob("*.tar"))
    return [decode_raw_sample(s) for s in wds.DataPipeline(wds.SimpleShardList(urls), wds.tarfile_to_samples())]


def test_parquet_round_trip_through_lf_shards(tmp_path):
    for i in range(10):
        (tmp_path / f"img{i}.png").write_bytes(png((i * 25, 0, 0)))
    table = pa.table(
        {
            "file": [f"img{i}.png" for i in range(10)],
            "text": [f"caption {i}" for i in range(10)],
            "score": [i / 10 for i in range(10)],
        }
    )
    pq.write_table(table, tmp_path / "captions.parquet", row_group_size=3)
    summary = run_shards(
        compose_config(
            "shards",
            [
                "source=table",
                f"source.table={tmp_path / 'captions.parquet'}",
                "source.path_column=file",
                "source.caption_column=text",
                "source.batch_rows=4",
                f"out_dir={tmp_path / 'raw'}",
                "samples_per_shard=4",
                "progress=false",
            ],
        )
    )
    assert summary["samples"] == 10 and len(summary["shards"]) == 3
    samples = read_back(tmp_path / "raw")
    assert [caption for _, _, caption, _ in samples] == [f"caption {i}" for i in range(10)]
    _, image, _, meta = samples[7]
    assert image.size == (12, 9) and image.getpixel((0, 0)) == (175, 0, 0)
    assert meta == {"source_path": "img7.png", "score": 0.7}


def test_parquet_reads_row_batches_not_the_whole_table(tmp_path, monkeypatch):
    rows = 50
    table = pa.table(
        {"image": [{"bytes": png((i, i, i)), "path": f"{i}.png"} for i in range(rows)], "caption": ["c"] * rows}
    )
    pq.write_table(table, tmp_path / "t.parquet", row_group_size=10)
    batches = []
    original = pq.ParquetFile.iter_batches

    def spy(self, *args, **kwargs):
        for batch in original(self, *args, **kwargs):
            batches.append(batch.num_rows)
            yield batch

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", spy)
    source = CaptionTableSource(str(tmp_path / "t.parquet"), path_column="image", batch_rows=8)
    first = next(iter(source))
    assert batches == [8], "one batch read for the first row"
    assert first.meta == {"source_path": "0.png"} and first.origin.endswith("t.parquet:row 0")
    assert write_raw_shards(source, tmp_path / "raw").samples == rows
    assert max(batches) <= 8


def test_parquet_errors_name_file_row_and_column(tmp_path):
    pq.write_table(pa.table({"path": ["a.png"], "text": ["x"]}), tmp_path / "t.parquet")
    with pytest.raises(DataError, match=r"t\.parquet: column 'caption' is missing"):
        list(CaptionTableSource(str(tmp_path / "t.parquet")))
    pq.write_table(pa.table({"path": ["https://example.com/a.jpg"], "caption": ["x"]}), tmp_path / "u.parquet")
    with pytest.raises(DataError, match=r"u\.parquet:row 0: key 'path' is a URL .*img2dataset"):
        list(CaptionTableSource(str(tmp_path / "u.parquet")))
    (tmp_path / "bad.parquet").write_bytes(b"not parquet")
    with pytest.raises(DataError, match=r"bad\.parquet: not a readable Parquet file"):
        list(CaptionTableSource(str(tmp_path / "bad.parquet")))
