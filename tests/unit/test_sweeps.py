"""Sweep parts in isolation: trial records, the summary, the NaN guard, Optuna bookkeeping, pruning."""

from __future__ import annotations

import contextlib
import csv
import math
import socket
import sqlite3
import subprocess
import sys

import optuna
import pytest
import torch
from omegaconf import OmegaConf
from optuna.trial import TrialState

from lf_common.errors import ConfigError, DataError
from trainer.callbacks.finite_loss import FiniteLossGuard, NonFiniteLossError
from trainer.callbacks.optuna_pruning import OptunaPruning
from trainer.sweeps.optuna_sweeper import ResumableOptunaSweeperImpl
from trainer.sweeps.study import counted_trials, fail_interrupted_trials, make_sqlite_folder, open_storage, owner_record
from trainer.sweeps.summary import rank_trials, swept_parameters, write_summary
from trainer.sweeps.trial import FAILED_VALUE, TRIAL_FILE, TrialRecord, in_sweep, run_trial

optuna.logging.set_verbosity(optuna.logging.WARNING)


def record(number, value, status="complete", direction="minimize", **params) -> TrialRecord:
    overrides = [f"{k.replace('__', '.')}={v}" for k, v in params.items()]
    return TrialRecord(number, overrides, "val/loss", direction, value, status)


def trial_kwargs(tmp_path, catch: bool) -> dict:
    return dict(metric="val/loss", direction="minimize", output_dir=tmp_path, overrides=["optim.lr=1"], number=0,
                catch_failures=catch)  # fmt: skip


def test_run_trial_records_the_metric(tmp_path):
    value = run_trial(lambda: {"val/loss": 0.25, "global_step": 7}, **trial_kwargs(tmp_path, catch=True))
    saved = TrialRecord.read(tmp_path / TRIAL_FILE)
    assert value == 0.25 and saved.value == 0.25 and saved.status == "complete" and saved.global_step == 7
    assert saved.params() == {"optim.lr": "1"}


def diverge() -> dict:
    raise NonFiniteLossError("train/loss is nan at step 3")


def test_run_trial_in_a_sweep_turns_divergence_into_a_failed_record(tmp_path):
    value = run_trial(diverge, **trial_kwargs(tmp_path, catch=True))
    saved = TrialRecord.read(tmp_path / TRIAL_FILE)
    assert math.isnan(value) and math.isnan(FAILED_VALUE)
    assert saved.status == "failed" and "NonFiniteLossError: train/loss is nan" in saved.error


def test_run_trial_alone_raises_divergence_but_still_records_it(tmp_path):
    with pytest.raises(NonFiniteLossError):
        run_trial(diverge, **trial_kwargs(tmp_path, catch=False))
    assert TrialRecord.read(tmp_path / TRIAL_FILE).status == "failed"


def test_run_trial_other_errors_stop_the_sweep(tmp_path):
    def bad_config() -> dict:
        raise ValueError("data.train_dir does not exist")

    with pytest.raises(ValueError):
        run_trial(bad_config, **trial_kwargs(tmp_path, catch=True))


def test_missing_metric_fails_a_sweep_trial_but_not_a_plain_run(tmp_path):
    assert math.isnan(run_trial(lambda: {"train/loss": 0.3}, **trial_kwargs(tmp_path, catch=True)))
    saved = TrialRecord.read(tmp_path / TRIAL_FILE)
    assert saved.status == "failed" and "'val/loss' was not logged" in saved.error and "train/loss" in saved.error
    assert math.isnan(run_trial(lambda: {"train/loss": 0.3}, **trial_kwargs(tmp_path, catch=False)))
    assert TrialRecord.read(tmp_path / TRIAL_FILE).status == "complete"


def test_only_multirun_jobs_and_wandb_sweep_runs_are_trials(monkeypatch):
    monkeypatch.delenv("WANDB_SWEEP_ID", raising=False)
    assert in_sweep(multirun=True) and not in_sweep(multirun=False)
    monkeypatch.setenv("WANDB_SWEEP_ID", "abc123")  # set by `wandb agent` for the runs it starts
    assert in_sweep(multirun=False)


def test_pruned_trial_is_recorded_as_pruned(tmp_path):
    def pruned() -> dict:
        raise optuna.TrialPruned("val/loss=0.9 at step 100")

    assert math.isnan(run_trial(pruned, **trial_kwargs(tmp_path, catch=True)))
    assert TrialRecord.read(tmp_path / TRIAL_FILE).status == "pruned"


def test_unknown_direction_is_refused(tmp_path):
    kwargs = {**trial_kwargs(tmp_path, catch=True), "direction": "lowest"}
    with pytest.raises(ValueError, match="minimize"):
        run_trial(lambda: {"val/loss": 1.0}, **kwargs)


@pytest.mark.parametrize("direction", ["minimize", "maximize"])
def test_rank_trials_best_first_in_its_direction_failed_last(direction):
    trials = [
        record(0, 0.5, direction=direction),
        record(1, None, "failed", direction=direction),
        record(2, 0.2, direction=direction),
        record(3, 0.9, "pruned", direction=direction),
        record(4, 0.7, direction=direction),
    ]
    order = [t.number for t in rank_trials(trials)]
    assert order == ([2, 0, 4, 3, 1] if direction == "minimize" else [4, 0, 2, 3, 1])


def test_swept_parameters_are_the_overrides_that_differ():
    trials = [
        record(0, 1.0, optim__lr="1e-4", data__batch_size=8, seed=1, optuna_trial_number=0),
        record(1, 1.0, optim__lr="1e-3", data__batch_size=8, seed=1, optuna_trial_number=1),
        record(2, 1.0, optim__lr="1e-3", data__batch_size=16, seed=1, optuna_trial_number=2),
    ]
    assert swept_parameters(trials) == ["optim.lr", "data.batch_size"]


def test_write_summary_tables_and_plot(tmp_path):
    for number, (lr, bs, value) in enumerate([("1e-4", 8, 0.4), ("1e-3", 8, 0.3), ("1e-2", 16, None)]):
        folder = tmp_path / "worker-0" / str(number)
        folder.mkdir(parents=True)
        status = "complete" if value is not None else "failed"
        record(number, value, status, optim__lr=lr, data__batch_size=bs).write(folder)
    summary = write_summary(tmp_path)
    rows = list(csv.DictReader(summary.csv.open()))
    assert [(r["rank"], r["trial"], r["optim.lr"], r["status"]) for r in rows] == [
        ("1", "1", "1e-3", "complete"),
        ("2", "0", "1e-4", "complete"),
        ("3", "2", "1e-2", "failed"),
    ]
    text = summary.markdown.read_text()
    assert text.startswith("# Sweep summary: val/loss (minimize), best first")
    assert text.count("\n| ") == 5  # header, rule, 3 trials
    assert summary.plot is not None and summary.plot.read_bytes()[:4] == b"\x89PNG"


def test_write_summary_without_trials_names_the_folder(tmp_path):
    with pytest.raises(DataError, match=str(tmp_path)):
        write_summary(tmp_path)


class FakeTrainer:
    global_step = 3


def test_finite_loss_guard_raises_on_nan_and_passes_finite():
    guard = FiniteLossGuard()
    guard.on_train_batch_end(FakeTrainer(), None, torch.tensor(0.5), None, 0)
    guard.on_train_batch_end(FakeTrainer(), None, {"loss": torch.tensor(1.0)}, None, 0)
    with pytest.raises(NonFiniteLossError, match="step 3"):
        guard.on_train_batch_end(FakeTrainer(), None, {"loss": torch.tensor(float("nan"))}, None, 2)
    with pytest.raises(NonFiniteLossError, match="inf"):
        guard.on_train_batch_end(FakeTrainer(), None, torch.tensor(float("inf")), None, 2)


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_interrupted_trials_are_failed_and_not_counted(tmp_path):
    storage = open_storage(f"sqlite:///{tmp_path / 'deep' / 'optuna.db'}")  # the folder is created
    study = optuna.create_study(study_name="s", storage=storage)
    for value in (1.0, 2.0):
        study.tell(study.ask(), value)
    orphan, live, older_orphan = study.ask(), study.ask(), study.ask()
    orphan.set_user_attr("latentforge_owner", [socket.gethostname(), dead_pid()])
    live.set_user_attr("latentforge_owner", owner_record())
    older = storage.get_trial_id_from_study_id_trial_number(storage.get_study_id_from_name("s"), older_orphan.number)
    storage.set_trial_system_attr(older, "latentforge_host", socket.gethostname())  # a study of an older version
    storage.set_trial_system_attr(older, "latentforge_pid", dead_pid())
    assert counted_trials(study) == 5
    assert fail_interrupted_trials(study, storage) == 2
    trials = optuna.load_study(study_name="s", storage=f"sqlite:///{tmp_path / 'deep' / 'optuna.db'}").trials
    states = [t.state for t in trials]
    assert states == [TrialState.COMPLETE, TrialState.COMPLETE, TrialState.FAIL, TrialState.RUNNING, TrialState.FAIL]
    assert [t.number for t in trials if t.user_attrs.get("latentforge_interrupted")] == [2, 4]
    assert counted_trials(study) == 3  # the interrupted ones will be re-asked; the live one counts


def test_a_study_of_an_older_optuna_is_refused_with_the_command_that_upgrades_it(tmp_path):
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    optuna.create_study(study_name="s", storage=url)
    with contextlib.closing(sqlite3.connect(tmp_path / "optuna.db")) as db, db:
        db.execute("UPDATE alembic_version SET version_num = 'v2.6.0.a'")  # as Optuna 2.10 (latentforge < 0.2) left it
        db.execute("UPDATE version_info SET library_version = '2.10.1'")
    with pytest.raises(ConfigError, match=rf"hydra\.sweeper\.storage={url}: .*optuna 2\.10\.1.* --storage {url}\)$"):
        open_storage(url)


def test_make_sqlite_folder_only_for_sqlite_urls(tmp_path):
    make_sqlite_folder(f"sqlite:///{tmp_path / 'a' / 'b' / 'optuna.db'}")
    make_sqlite_folder(f"postgresql://host/{tmp_path / 'c'}")
    assert (tmp_path / "a" / "b").is_dir() and not (tmp_path / "c").exists()


def test_a_worker_that_ran_no_trial_still_records_the_best(tmp_path):
    """With several workers on one study, one may find every trial taken and create no job folder."""
    study = optuna.create_study()
    study.tell(study.ask(), 0.5)
    sweeper = object.__new__(ResumableOptunaSweeperImpl)
    sweeper.config = OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path / "worker-1")}}})
    sweeper._save_results(study)
    assert OmegaConf.load(tmp_path / "worker-1" / "optimization_results.yaml").best_value == 0.5


class PruningTrainer:
    """The parts of a Trainer that OptunaPruning reads."""

    sanity_checking = False
    is_global_zero = True

    def __init__(self, step: int, value: float) -> None:
        self.global_step = step
        self.callback_metrics = {"val/loss": torch.tensor(value)}
        self.strategy = type("Strategy", (), {"broadcast": staticmethod(lambda obj, src=0: obj)})()


def test_pruning_reports_and_prunes_a_trial_worse_than_the_median(tmp_path):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(study_name="s", storage=storage)
    for value in (0.1, 0.2):  # two finished trials that reported 0.1 and 0.2 at step 10
        trial = study.ask()
        trial.report(value, step=10)
        study.tell(trial, value)
    good, bad = study.ask(), study.ask()
    pruner = optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0)
    OptunaPruning(storage, "s", good.number, "val/loss", pruner).on_validation_end(PruningTrainer(10, 0.05), None)
    with pytest.raises(optuna.TrialPruned, match=r"val/loss=0\.9 at step 10"):
        OptunaPruning(storage, "s", bad.number, "val/loss", pruner).on_validation_end(PruningTrainer(10, 0.9), None)
    reported = {t.number: t.intermediate_values for t in optuna.load_study(study_name="s", storage=storage).trials}
    assert reported[good.number] == {10: pytest.approx(0.05)} and reported[bad.number] == {10: pytest.approx(0.9)}


def test_pruning_outside_a_sweep_does_nothing(tmp_path):
    callback = OptunaPruning(f"sqlite:///{tmp_path / 'none.db'}", "s", None, "val/loss")
    callback.on_validation_end(PruningTrainer(10, 0.9), None)
    assert not (tmp_path / "none.db").exists()


def test_a_failed_trial_closes_its_wandb_run_so_the_next_trial_starts_its_own(tmp_path, monkeypatch):
    import wandb
    from lightning.pytorch.loggers import WandbLogger

    from trainer.cli.hydra_app import finishing_loggers

    monkeypatch.setenv("WANDB_MODE", "offline")
    run_ids = []
    for attempt in range(2):
        logger = WandbLogger(project="latentforge", save_dir=str(tmp_path), offline=True)
        trainer = type("Trainer", (), {"loggers": [logger]})()
        with pytest.raises(NonFiniteLossError), finishing_loggers(trainer):
            run_ids.append(logger.experiment.id)
            raise NonFiniteLossError(f"attempt {attempt}")
        assert wandb.run is None
    assert run_ids[0] != run_ids[1]


def test_a_trial_left_without_owner_is_interrupted_only_under_the_study_lock(tmp_path):
    """A sweeper killed between ``study.ask`` and recording itself leaves a RUNNING trial with no owner; under
    the SQLite lock (every sweeper asks and records inside it) that trial is failed, without the lock it may be
    another sweeper's, between its two writes, and stays."""
    storage = open_storage(f"sqlite:///{tmp_path / 'optuna.db'}")
    study = optuna.create_study(study_name="s", storage=storage)
    study.tell(study.ask(), 1.0)
    study.ask()  # no owner: its sweeper was killed right after asking
    assert fail_interrupted_trials(study, storage) == 0
    assert fail_interrupted_trials(study, storage, locked=True) == 1
    assert [t.state for t in study.get_trials()] == [TrialState.COMPLETE, TrialState.FAIL]
    assert counted_trials(study) == 1
