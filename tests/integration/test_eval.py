"""``lf-eval`` from the command line: FID, KID and CLIP score of an export, the same on two processes
(writing to a bucket of a real S3 server) as on one, with the reference features extracted once and read
from the cache after."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lf_common import object_store
from tests.conftest import compose_config
from tests.integration.cli import run_cli
from tests.s3_server import upload_times
from trainer.cli.eval import RESULT_NAME, run_eval

pytestmark = [pytest.mark.slow, pytest.mark.dist]
METRICS = ("fid", "kid", "kid_std", "num_images", "num_reference")


def eval_overrides(model: Path, shards: Path, clip: Path, cache: Path, out: Path | str) -> list[str]:
    """Five images (an odd count: two ranks get 3 and 2+padding) of the tiny model, digits features."""
    return [
        f"model_dir={model}",
        f"prompt_shards={shards}",
        "max_prompts=5",
        "steps=2",
        "features=digits",
        f"reference={shards}",
        f"clip={clip}",
        f"cache_dir={cache}",
        "kid_subsets=10",
        "accelerator=cpu",
        f"out_dir={out}",
    ]


def test_two_processes_score_like_one_and_reuse_the_cached_reference(
    base_model, raw_shards, tiny_clip_dir, s3_bucket, tmp_path
):
    overrides = eval_overrides(base_model, raw_shards, tiny_clip_dir, tmp_path / "cache", tmp_path / "one")
    one = run_eval(compose_config("eval", overrides))
    assert not one["reference"]["cached"] and Path(one["reference"]["cache_entry"]).is_file()
    assert one["num_images"] == 5 and one["num_reference"] == 96
    assert one["fid"] > 0 and one["kid_std"] >= 0 and one["clip_score"] >= 0

    # two processes, out_dir in the bucket: each rank uploads its images, rank 0 eval.json once all are up
    two_out = f"{s3_bucket}/two"
    two_overrides = eval_overrides(base_model, raw_shards, tiny_clip_dir, tmp_path / "cache", two_out)
    result = run_cli("lf-eval", *two_overrides, "devices=2", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    two = json.loads(object_store.read_bytes(f"{two_out}/{RESULT_NAME}"))
    assert two["processes"] == 2 and two["reference"]["cached"], "the second run reads the reference from the cache"
    assert {k: two[k] for k in METRICS} == pytest.approx({k: one[k] for k in METRICS}, rel=1e-9)
    assert two["clip_score"] == pytest.approx(one["clip_score"], rel=1e-3), "float32 CLIP in other batch sizes"
    for table_line in ("FID", "KID", "CLIP score"):
        assert table_line in result.stdout

    assert (two["out_dir"], two["images_dir"], two["grid"]) == (two_out, f"{two_out}/images", f"{two_out}/grid.png")

    uploaded = upload_times(two_out)
    images = sorted(name.removeprefix("images/") for name in uploaded if name.startswith("images/"))
    assert images == sorted(p.name for p in (tmp_path / "one" / "images").glob("*.png"))
    assert images == [f"{i:05d}-{i}.png" for i in range(5)], "each image once (both ranks'), by its index and seed"
    assert sorted(uploaded) == sorted([*(f"images/{name}" for name in images), "grid.png", RESULT_NAME])
    assert max(t for name, t in uploaded.items() if name != RESULT_NAME) < uploaded[RESULT_NAME], "eval.json last"
    for name in images:  # rank 0 made 0, 2 and 4, rank 1 made 1 and 3
        assert object_store.read_bytes(f"{two_out}/images/{name}") == (tmp_path / "one" / "images" / name).read_bytes()
    assert json.loads((tmp_path / "one" / RESULT_NAME).read_text())["config"]["features"]["_target_"].endswith(
        "DigitsFeatures"
    )
