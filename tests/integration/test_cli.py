"""The console scripts: a Hydra sweep, W&B offline logging, shards and their validation, quiet output.

Their errors for bad input: ``tests/unit/test_plain_errors.py``.
"""

import json

import pytest

from tests.conftest import tiny_train_overrides
from tests.integration.cli import run_cli

pytestmark = pytest.mark.slow


def test_two_trial_sweep(latent_dir, tmp_path):
    overrides = [o for o in tiny_train_overrides(latent_dir, tmp_path, steps=2) if not o.startswith("output_dir=")]
    result = run_cli(
        "lf-train", "-m", "optim.lr=1e-4,3e-4", *overrides, "output_dir=${hydra:runtime.output_dir}", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]
    trials = sorted(t for t in (tmp_path / "multirun").iterdir() if t.is_dir())
    assert [t.name for t in trials] == ["0", "1"]
    for trial, lr in zip(trials, ("0.0001", "0.0003"), strict=True):
        assert (trial / "checkpoints" / "last.ckpt").is_file()
        assert f"optim.lr={lr}" in (trial / ".hydra" / "overrides.yaml").read_text()


def test_wandb_offline_logging(latent_dir, tmp_path):
    result = run_cli(
        "lf-train",
        *tiny_train_overrides(latent_dir, tmp_path / "run", steps=3),
        "logger=wandb",
        "logger.wandb.offline=true",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    runs = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))
    # a plain run (no sweep, no validation data): no trial record, no warning about the sweep metric
    assert not list(tmp_path.rglob("trial.json"))
    assert "optimized_metric" not in result.stderr
    # quiet by default: no notice about torchvision (never installed), no litlogger advertisement
    output = result.stdout + result.stderr
    assert "Traceback" not in output
    assert not [line for line in output.splitlines() if "torchvision" in line or "litlogger" in line]


def test_shards_from_the_command_line(tmp_path):
    result = run_cli(
        "lf-shards", "source.limit=20", f"out_dir={tmp_path / 'shards'}", "samples_per_shard=8", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "shards: 20 samples in 3 shards" in result.stdout
    assert json.loads((tmp_path / "shards" / "shards_summary.json").read_text())["samples"] == 20


def test_validate_exit_status(tmp_path):
    good = run_cli("lf-shards", "source.limit=4", f"out_dir={tmp_path / 'shards'}", cwd=tmp_path)
    assert good.returncode == 0, good.stderr[-2000:]
    assert run_cli("lf-validate", f"shards={tmp_path / 'shards'}", cwd=tmp_path).returncode == 0
    shard = tmp_path / "shards" / "shard-000000.tar"
    shard.write_bytes(shard.read_bytes()[:3000])
    result = run_cli("lf-validate", f"shards={tmp_path / 'shards'}", cwd=tmp_path)
    assert result.returncode == 1
    assert "BROKEN" in result.stdout
    assert "validate: 1 shard, " in result.stdout and "; 1 shard with problems, " in result.stdout
