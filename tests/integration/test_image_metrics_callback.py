"""FID, KID and CLIP score in the training loop: logged from two processes under DDP and ZeRO-2, and a
sweep that optimises ``val/fid``."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest

from tests.conftest import tiny_train_overrides
from tests.integration.cli import run_cli
from trainer.sweeps.trial import TRIAL_FILE, TrialRecord

pytestmark = pytest.mark.slow


def image_metrics_overrides(raw_shards: Path, clip: Path | None, every: int) -> list[str]:
    """Three prompts (captions of the digit shards), two sampling steps, digits features."""
    overrides = [
        "callbacks=with_image_metrics",
        "features@callbacks.image_metrics.features=digits",
        f"callbacks.image_metrics.prompt_shards={raw_shards}",
        "callbacks.image_metrics.max_prompts=3",
        f"callbacks.image_metrics.reference={raw_shards}",
        f"callbacks.image_metrics.every_n_steps={every}",
        "callbacks.image_metrics.steps=2",
        "callbacks.image_metrics.kid_subsets=5",
        "callbacks.image_metrics.cache_dir=null",
    ]
    return [*overrides, f"callbacks.image_metrics.clip={clip}"] if clip else overrides


def logged_rows(run: Path) -> list[dict[str, str]]:
    with open(run / "csv" / "version_0" / "metrics.csv", newline="") as handle:
        return [row for row in csv.DictReader(handle) if row.get("val/fid")]


@pytest.mark.dist
@pytest.mark.parametrize("strategy", ["ddp", "deepspeed_stage_2"])
def test_two_processes_log_fid_kid_and_clip_score(strategy, latent_dir, raw_shards, tiny_clip_dir, tmp_path):
    run = tmp_path / "run"
    result = run_cli(
        "lf-train",
        *tiny_train_overrides(latent_dir, run, steps=2),
        f"strategy={strategy}",
        "trainer.devices=2",
        "data.batch_size=8",
        *image_metrics_overrides(raw_shards, tiny_clip_dir, every=2),
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = logged_rows(run)
    assert [int(row["step"]) for row in rows] == [2], "once, at step 2 (not again after the last step)"
    for name in ("val/fid", "val/kid", "val/clip_score"):
        assert math.isfinite(float(rows[0][name])), name
    assert (run / "csv" / "version_0" / "images" / "val-step0000002.png").is_file(), "the sample grid"
    assert (tmp_path / "hydra" / "train_ddp_process_1.log").is_file(), "a second process ran"


def test_a_sweep_optimises_val_fid(latent_dir, raw_shards, tmp_path):
    base = [o for o in tiny_train_overrides(latent_dir, tmp_path, steps=2) if not o.startswith("output_dir=")]
    result = run_cli(
        "lf-train",
        "-m",
        *base,
        *image_metrics_overrides(raw_shards, None, every=2),
        "optimized_metric=val/fid",
        "optimized_direction=minimize",
        "optim.lr=1e-4,3e-3",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    records = [TrialRecord.read(p) for p in sorted((tmp_path / "multirun").glob(f"*/{TRIAL_FILE}"))]
    assert [r.status for r in records] == ["complete", "complete"]
    assert all(r.metric == "val/fid" and math.isfinite(r.value) for r in records)
    with open(tmp_path / "multirun" / "summary.csv", newline="") as handle:
        ranked = [float(row["val/fid"]) for row in csv.DictReader(handle)]
    assert ranked == pytest.approx(sorted(r.value for r in records), abs=1e-3), "best (lowest FID) first"
