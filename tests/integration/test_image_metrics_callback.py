"""FID, KID and CLIP score in the training loop: logged from two processes under DDP (prompts, reference
and CLIP in a bucket of a real S3 server) and ZeRO-2 (local files), and a sweep that optimises ``val/fid``."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from lf_common import object_store
from lf_common.object_cache import CACHE_DIR_VARIABLE
from tests.conftest import tiny_train_overrides
from tests.integration.cli import run_cli
from tests.s3_server import upload_folder
from trainer.evaluation.digits_features import DigitsFeatures
from trainer.evaluation.reference import FEATURES_KEY, RawShardsReference, ReferenceKey, reference_features
from trainer.sweeps.trial import TRIAL_FILE, TrialRecord

pytestmark = pytest.mark.slow


def image_metrics_overrides(
    raw_shards: Path | str, clip: Path | str | None, every: int, cache_dir: Path | None = None
) -> list[str]:
    """Three prompts (captions of the digit shards), two sampling steps, digits features; the reference
    features cached in ``cache_dir`` (``None``: not cached)."""
    overrides = [
        "callbacks=with_image_metrics",
        "features@callbacks.image_metrics.features=digits",
        f"callbacks.image_metrics.prompt_shards={raw_shards}",
        "callbacks.image_metrics.max_prompts=3",
        f"callbacks.image_metrics.reference={raw_shards}",
        f"callbacks.image_metrics.every_n_steps={every}",
        "callbacks.image_metrics.steps=2",
        "callbacks.image_metrics.kid_subsets=5",
        f"callbacks.image_metrics.cache_dir={cache_dir or 'null'}",
    ]
    return [*overrides, f"callbacks.image_metrics.clip={clip}"] if clip else overrides


def logged_rows(run: Path) -> list[dict[str, str]]:
    with open(run / "csv" / "version_0" / "metrics.csv", newline="") as handle:
        return [row for row in csv.DictReader(handle) if row.get("val/fid")]


def cache_entry(cache_dir: Path) -> tuple[ReferenceKey, torch.Tensor]:
    """The key and features of the one reference-features cache entry in ``cache_dir``."""
    (entry,) = cache_dir.glob("*.safetensors")
    with safe_open(str(entry), "pt") as handle:
        key = ReferenceKey(**json.loads(handle.metadata()["key"]))
        features = handle.get_tensor(FEATURES_KEY)
    assert entry.name == key.file_name()
    return key, features


@pytest.mark.dist
@pytest.mark.parametrize(("strategy", "inputs"), [("ddp", "bucket"), ("deepspeed_stage_2", "local")])
def test_two_processes_log_fid_kid_and_clip_score(
    strategy, inputs, latent_dir, raw_shards, tiny_clip_dir, tmp_path, request, monkeypatch
):
    shards, clip, cache = raw_shards, tiny_clip_dir, None
    if inputs == "bucket":  # prompt_shards, reference (streamed) and the CLIP folder (downloaded once) by URL
        bucket = request.getfixturevalue("s3_bucket")
        upload_folder(raw_shards, f"{bucket}/raw", "*.tar")
        object_store.upload_folder(tiny_clip_dir, f"{bucket}/models/clip")
        monkeypatch.setenv(CACHE_DIR_VARIABLE, str(tmp_path / "downloads"))  # the ranks' download cache
        shards, clip, cache = f"{bucket}/raw/", f"{bucket}/models/clip", tmp_path / "features"
    run = tmp_path / "run"
    result = run_cli(
        "lf-train",
        *tiny_train_overrides(latent_dir, run, steps=2),
        f"strategy={strategy}",
        "trainer.devices=2",
        "data.batch_size=8",
        *image_metrics_overrides(shards, clip, every=2, cache_dir=cache),
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = logged_rows(run)
    assert [int(row["step"]) for row in rows] == [2], "once, at step 2 (not again after the last step)"
    for name in ("val/fid", "val/kid", "val/clip_score"):
        assert math.isfinite(float(rows[0][name])), name
    assert (run / "csv" / "version_0" / "images" / "val-step0000002.png").is_file(), "the sample grid"
    assert (tmp_path / "hydra" / "train_ddp_process_1.log").is_file(), "a second process ran"
    if inputs == "bucket":
        # the reference features both ranks extracted from the bucket's shards are those of the local files
        described = f"reference features of 3 raw shards ({shards}shard-000000.tar, ...): 96 images"
        assert described in (tmp_path / "hydra" / "train.log").read_text()
        key, features = cache_entry(cache)
        local = RawShardsReference(str(raw_shards))
        assert (key.content_sha256, key.extractor) == (local.content_sha256(), DigitsFeatures().fingerprint())
        size = tuple(key.preprocessing["size"])
        assert torch.equal(features, reference_features(local, DigitsFeatures(), size, None).features.float())
        assert any((tmp_path / "downloads").rglob("config.json")), "CLIP downloaded into the download cache"


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
