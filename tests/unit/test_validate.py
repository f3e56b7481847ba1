import io
import json

from PIL import Image

from data_pipelines.raw.validate import problem_lines, summary_line, validate_shard
from data_pipelines.raw.writer import write_raw_shards
from data_pipelines.shards.tar_writer import open_tar_writer
from tests.conftest import FirstDigits, compose_config
from trainer.cli.validate import run_validate


def png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_clean_shards_pass(tmp_path):
    write_raw_shards(FirstDigits(10), tmp_path, samples_per_shard=5)
    result = run_validate(compose_config("validate", [f"shards={tmp_path}", f"report={tmp_path / 'r.json'}"]))
    assert result["ok"] and [s["samples"] for s in result["shards"]] == [5, 5]
    assert json.loads((tmp_path / "r.json").read_text())["ok"] is True


def test_each_kind_of_damage_is_reported(tmp_path):
    path = tmp_path / "bad.tar"
    with open_tar_writer(path) as writer:
        writer.write({"__key__": "a", "png": png(), "txt": b"fine"})
        writer.write({"__key__": "b", "png": b"\x89PNG not an image", "txt": b"bad image"})
        writer.write({"__key__": "c", "png": png()})  # no caption
        writer.write({"__key__": "d", "txt": b"no image"})
        writer.write({"__key__": "a", "png": png(), "txt": b"again"})  # duplicate key
    report = validate_shard(path)
    assert (report.samples, report.undecodable, report.missing_caption) == (5, ["b"], ["c"])
    assert (report.missing_image, report.duplicate_keys, report.truncated) == (["d"], ["a"], None)
    assert not report.ok
    # what lf-validate prints: the bad keys with what is wrong (the first `shown` and a count), then the totals
    assert problem_lines([report], shown=2) == [
        f"{path}: 4 bad samples: b (image does not decode), d (no image), and 2 more"
    ]
    assert summary_line([report]) == "1 shard, 5 samples; 1 shard with problems, 4 bad samples"


def test_truncated_tar_is_reported(tmp_path):
    write_raw_shards(FirstDigits(6), tmp_path / "whole", samples_per_shard=6)
    data = (tmp_path / "whole" / "shard-000000.tar").read_bytes()
    (tmp_path / "cut.tar").write_bytes(data[: len(data) // 2 + 100])
    report = validate_shard(tmp_path / "cut.tar")
    assert report.truncated is not None and not report.ok
    assert report.samples < 6
