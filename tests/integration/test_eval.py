"""``lf-eval`` from the command line: FID, KID and CLIP score of an export, the same on two processes
as on one, with the reference features extracted once and read from the cache after."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import compose_config
from tests.integration.cli import run_cli
from trainer.cli.eval import RESULT_NAME, run_eval

pytestmark = [pytest.mark.slow, pytest.mark.dist]
METRICS = ("fid", "kid", "kid_std", "num_images", "num_reference")


def eval_overrides(model: Path, shards: Path, clip: Path, cache: Path, out: Path) -> list[str]:
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


def test_two_processes_score_like_one_and_reuse_the_cached_reference(base_model, raw_shards, tiny_clip_dir, tmp_path):
    overrides = eval_overrides(base_model, raw_shards, tiny_clip_dir, tmp_path / "cache", tmp_path / "one")
    one = run_eval(compose_config("eval", overrides))
    assert not one["reference"]["cached"] and Path(one["reference"]["cache_entry"]).is_file()
    assert one["num_images"] == 5 and one["num_reference"] == 96
    assert one["fid"] > 0 and one["kid_std"] >= 0 and one["clip_score"] >= 0

    two_overrides = [*eval_overrides(base_model, raw_shards, tiny_clip_dir, tmp_path / "cache", tmp_path / "two")]
    result = run_cli("lf-eval", *two_overrides, "devices=2", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    two = json.loads((tmp_path / "two" / RESULT_NAME).read_text())
    assert two["processes"] == 2 and two["reference"]["cached"], "the second run reads the reference from the cache"
    assert {k: two[k] for k in METRICS} == pytest.approx({k: one[k] for k in METRICS}, rel=1e-9)
    assert two["clip_score"] == pytest.approx(one["clip_score"], rel=1e-3), "float32 CLIP in other batch sizes"
    for table_line in ("FID", "KID", "CLIP score"):
        assert table_line in result.stdout

    images = sorted(p.name for p in (tmp_path / "two" / "images").glob("*.png"))
    assert images == sorted(p.name for p in (tmp_path / "one" / "images").glob("*.png"))
    assert images == [f"{i:05d}-{i}.png" for i in range(5)], "each image once, named by its index and seed"
    assert (tmp_path / "two" / "images" / images[3]).read_bytes() == (
        tmp_path / "one" / "images" / images[3]
    ).read_bytes()
    assert (tmp_path / "two" / "grid.png").is_file()
    assert json.loads((tmp_path / "one" / RESULT_NAME).read_text())["config"]["features"]["_target_"].endswith(
        "DigitsFeatures"
    )
