"""Sweeps from the command line: a grid with a diverging trial, Optuna (best, rerun, resume), W&B agent."""

from __future__ import annotations

import contextlib
import csv
import math
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import optuna
import pytest
import yaml

from tests.conftest import tiny_train_overrides
from tests.integration.cli import cli_command, run_cli
from trainer.sweeps.trial import TRIAL_FILE, TrialRecord

pytestmark = pytest.mark.slow


def sweep_overrides(latent_dir: Path, tmp_path: Path, steps: int = 4) -> list[str]:
    """Tiny trials that validate at their last step (val/loss is the optimized metric)."""
    base = [o for o in tiny_train_overrides(latent_dir, tmp_path, steps=steps) if not o.startswith("output_dir=")]
    return [
        *base,
        "experiment=sweep_short",
        f"data.val_dir={latent_dir}",
        f"trainer.max_steps={steps}",
        f"trainer.val_check_interval={steps}",
        "trainer.limit_val_batches=2",
        "trainer.log_every_n_steps=1",
        "callbacks.model_checkpoint.every_n_train_steps=1000",
    ]


def test_grid_sweep_records_a_diverged_trial_and_ranks_best_first(latent_dir, tmp_path):
    result = run_cli(
        "lf-train", "-m", *sweep_overrides(latent_dir, tmp_path), "optim.lr=1e-3,1e30", "data.batch_size=8,16",
        cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    sweep = tmp_path / "multirun"
    records = [TrialRecord.read(p) for p in sorted(sweep.glob(f"*/{TRIAL_FILE}"))]
    assert len(records) == 4
    diverged = [r for r in records if float(r.params()["optim.lr"]) == 1e30]
    assert [r.status for r in diverged] == ["failed", "failed"]
    assert all("NonFiniteLossError" in (r.error or "") for r in diverged)
    complete = sorted((r for r in records if r.status == "complete"), key=lambda r: r.value)
    assert len(complete) == 2 and all(math.isfinite(r.value) for r in complete)

    with open(sweep / "summary.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4
    assert [row["status"] for row in rows] == ["complete", "complete", "failed", "failed"]
    assert [float(row["val/loss"]) for row in rows[:2]] == pytest.approx([r.value for r in complete], rel=1e-5)
    assert {"optim.lr", "data.batch_size"} <= set(rows[0])
    assert "| rank | trial | status | val/loss |" in (sweep / "summary.md").read_text()
    assert (sweep / "summary.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def optuna_command(latent_dir: Path, tmp_path: Path, n_trials: int) -> list[str]:
    return [
        "-m",
        "hparams_search=lr_optuna",
        f"hydra.sweeper.n_trials={n_trials}",
        "optim.weight_decay=0.0",  # a fixed value takes the parameter out of the search space
        *sweep_overrides(latent_dir, tmp_path),
    ]


def load_study(tmp_path: Path) -> optuna.Study:
    return optuna.load_study(study_name="lr_optuna", storage=f"sqlite:///{tmp_path / 'multirun' / 'optuna.db'}")


def completed_trials(tmp_path: Path) -> int:
    """Complete trials so far (0 while the sweeper is still creating the study and its tables).

    Read straight from the database, read-only: ``optuna.load_study`` would create missing tables and
    race the sweeper that is creating them (its insert of the schema version then fails).
    """
    db = tmp_path / "multirun" / "optuna.db"
    if not db.exists():
        return 0
    try:
        with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)) as connection:
            (count,) = connection.execute("SELECT COUNT(*) FROM trials WHERE state = 'COMPLETE'").fetchone()
    except sqlite3.OperationalError:  # no tables yet, or locked
        return 0
    return count


def test_optuna_sweep_best_trial_reproduces_alone(latent_dir, tmp_path):
    result = run_cli("lf-train", *optuna_command(latent_dir, tmp_path, n_trials=4), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    study = load_study(tmp_path)
    assert len(study.trials) == 4
    records = {r.number: r for r in map(TrialRecord.read, (tmp_path / "multirun").glob(f"*/{TRIAL_FILE}"))}
    best_recorded = min((r for r in records.values() if r.status == "complete"), key=lambda r: r.value)
    results = yaml.safe_load((tmp_path / "multirun" / "optimization_results.yaml").read_text())
    assert results["best_value"] == pytest.approx(best_recorded.value, rel=1e-6)
    assert study.best_trial.number == best_recorded.number  # job numbers follow trial numbers

    alone = tmp_path / "alone"
    alone.mkdir()
    trial_overrides = [o for o in best_recorded.overrides if not o.startswith("++optuna_trial_number")]
    rerun = run_cli("lf-train", *trial_overrides, cwd=alone)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert not list((alone / "hydra").glob(TRIAL_FILE)), "a plain run is no trial: no trial.json"
    assert "optimized_metric" not in rerun.stderr
    (metrics,) = (alone / "hydra").rglob("metrics.csv")
    values = [float(row["val/loss"]) for row in csv.DictReader(metrics.open()) if row.get("val/loss")]
    assert values[-1] == pytest.approx(best_recorded.value, rel=1e-5)


def test_optuna_sweep_killed_then_resumed_runs_only_the_missing_trials(latent_dir, tmp_path):
    command, env = cli_command("lf-train", *optuna_command(latent_dir, tmp_path, n_trials=6), cwd=tmp_path)
    stderr_path = tmp_path / "killed_sweep.stderr"
    with stderr_path.open("wb") as stderr:
        process = subprocess.Popen(command, cwd=tmp_path, env=env, start_new_session=True,
                                   stdout=subprocess.DEVNULL, stderr=stderr)  # fmt: skip
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline and process.poll() is None:
            if completed_trials(tmp_path) >= 2:
                break
            time.sleep(0.5)
    finally:
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):  # it may end between the poll and the kill
                os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    assert process.returncode == -signal.SIGKILL, (
        f"the sweep ended by itself (exit {process.returncode}) before it was killed:\n"
        + stderr_path.read_text(errors="replace")[-3000:]
    )
    done_before = completed_trials(tmp_path)
    assert 2 <= done_before < 6

    result = run_cli("lf-train", *optuna_command(latent_dir, tmp_path, n_trials=6), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    study = load_study(tmp_path)
    interrupted = [t for t in study.trials if t.user_attrs.get("latentforge_interrupted")]
    counted = [t for t in study.trials if t not in interrupted]
    assert len(interrupted) <= 1 and all(t.state == optuna.trial.TrialState.FAIL for t in interrupted)
    assert len(counted) == 6  # not 2 + 6
    finished = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)  # the median rule may prune
    assert all(t.state in finished for t in counted)


def test_wandb_agent_command_reaches_lf_train_with_the_sampled_overrides(latent_dir, tmp_path, monkeypatch):
    from wandb import wandb_agent

    sweep = yaml.safe_load((Path(__file__).parents[2] / "conf" / "sweeps" / "wandb_lr.yaml").read_text())
    assert sweep["program"] == "lf-train" and sweep["metric"] == {"name": "val/loss", "goal": "minimize"}
    assert set(sweep["parameters"]) == {"optim.lr", "optim.weight_decay"}
    # What a user edits: the data folders; plus tiny-trial settings for this machine.
    command = [
        c for c in sweep["command"] if not c.startswith(("data.train_dir=", "data.val_dir="))
    ]  # fmt: skip
    at = command.index("${args_no_hyphens}")
    command[at:at] = [*sweep_overrides(latent_dir, tmp_path / "run"), f"output_dir={tmp_path / 'run'}"]

    launched: dict = {}
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_SWEEP_ID", "sweep123")
    monkeypatch.setenv("WANDB_RUN_ID", "unset")
    monkeypatch.setenv("WANDB_SWEEP_PARAM_PATH", "unset")
    monkeypatch.setattr(wandb_agent, "AgentProcess", lambda **kwargs: launched.update(kwargs) or SimpleNamespace())
    agent = wandb_agent.Agent(api=None, queue=None, sweep_id="sweep123")
    agent._sweep_command = command
    agent._command_run(
        {"run_id": "trial0001", "program": sweep["program"],
         "args": {"optim.lr": {"value": 0.00042}, "optim.weight_decay": {"value": 0.01}}}
    )  # fmt: skip
    argv = launched["command"]
    assert argv[:2] == ["/usr/bin/env", "lf-train"] and argv[-2:] == ["optim.lr=0.00042", "optim.weight_decay=0.01"]

    path = f"{Path(sys.executable).parent}{os.pathsep}{launched['env'].get('PATH', '')}"  # as in an activated venv
    env = {**launched["env"], "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", "PATH": path}
    result = subprocess.run(
        [*argv, f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    record = TrialRecord.read(tmp_path / "run" / TRIAL_FILE)
    assert {"optim.lr": "0.00042", "optim.weight_decay": "0.01"}.items() <= record.params().items()
    assert record.status == "complete" and math.isfinite(record.value)
    (run,) = (tmp_path / "run" / "wandb").glob("offline-run-*trial0001")
    assert list(run.glob("*.wandb"))


def test_parallel_workers_share_one_study_budget(latent_dir, tmp_path):
    script = Path(__file__).parents[2] / "launch" / "sweep_gpus.sh"
    bin_dir = Path(shutil.which("lf-train") or Path(sys.executable).parent / "lf-train").parent
    env = {**os.environ, "SWEEP_DIR": str(tmp_path / "sweep"), "HF_HUB_OFFLINE": "1",
           "LF_TRAIN": str(bin_dir / "lf-train"), "LF_SWEEP_SUMMARY": str(bin_dir / "lf-sweep-summary")}  # fmt: skip
    overrides = ["hparams_search=lr_optuna", "hydra.sweeper.n_trials=2", "optim.weight_decay=0.0",
                 *sweep_overrides(latent_dir, tmp_path), f"hydra.run.dir={tmp_path / 'hydra'}"]  # fmt: skip

    dry = subprocess.run(["bash", str(script), "--dry-run", "2", *overrides], env=env, capture_output=True, text=True)
    assert dry.returncode == 0, dry.stderr
    lines = dry.stdout.splitlines()
    assert [line.split()[1] for line in lines[:2]] == ["CUDA_VISIBLE_DEVICES=0", "CUDA_VISIBLE_DEVICES=1"]
    assert all(f"hydra.sweeper.storage=sqlite:///{tmp_path}/sweep/optuna.db" in line for line in lines[:2])

    result = subprocess.run(["bash", str(script), "2", *overrides], env={**env, "CPU_ONLY": "1"},
                            capture_output=True, text=True, timeout=600)  # fmt: skip
    logs = "".join(p.read_text()[-2000:] for p in (tmp_path / "sweep").glob("worker-*.log"))
    assert result.returncode == 0, result.stderr[-2000:] + logs
    study = optuna.load_study(study_name="lr_optuna", storage=f"sqlite:///{tmp_path / 'sweep' / 'optuna.db'}")
    assert len(study.trials) == 2  # one budget for both workers, not 2 each
    assert {t.state for t in study.trials} == {optuna.trial.TrialState.COMPLETE}
    rows = list(csv.DictReader((tmp_path / "sweep" / "summary.csv").open()))
    assert len(rows) == 2
