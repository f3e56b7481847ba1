"""Hydra's Optuna sweeper, made resumable and aware of failed and pruned trials.

``hydra-optuna-sweeper`` asks Optuna for ``n_trials`` *more* trials on every start, stops the sweep
at the first failed trial (``max_failure_rate: 0``), and cannot prune. This subclass keeps its
config and search-space parsing and changes the loop:

- ``n_trials`` is the study's total: a sweep restarted on the same storage runs only the missing
  trials. Trials left ``RUNNING`` by a killed sweeper process on this host are marked failed
  (``interrupted``) and not counted; the running trials of live workers (other processes sharing
  the storage, ``launch/sweep_gpus.sh``) are counted, so parallel workers share one budget.
- A trial that diverged, ran out of memory or missed its metric (``trial.json`` status
  ``failed``) is told to Optuna as FAIL and the sweep goes on; a pruned one as PRUNED.
- Each job gets ``++optuna_trial_number=N``, which :class:`trainer.callbacks.optuna_pruning.OptunaPruning`
  uses to report intermediate values and to stop hopeless trials.

Hydra loads it as ``hydra_plugins.latentforge_sweepers.resumable_optuna.ResumableOptunaSweeper`` (plugins must
live in that namespace); use it through ``conf/hparams_search/*.yaml`` (``lf-train -m hparams_search=lr_optuna``).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import socket
from pathlib import Path
from typing import Any

import optuna
from filelock import FileLock
from hydra.core.utils import JobReturn
from omegaconf import OmegaConf
from optuna.trial import TrialState

from lf_common.upstream.hydra_optuna_private import OptunaSweeperSteps
from lf_common.upstream.optuna_private import fail_trial
from trainer.sweeps.trial import TRIAL_FILE, TrialRecord

log = logging.getLogger(__name__)

TRIAL_NUMBER_KEY = "optuna_trial_number"
_OWNER, _INTERRUPTED = "latentforge_owner", "latentforge_interrupted"
_OWNER_HOST, _OWNER_PID = "latentforge_host", "latentforge_pid"  # older studies: two writes, a kill could split them


def owner_record() -> list[str | int]:
    """``[host, pid]`` of this sweeper process, written to a trial in ONE storage write (a kill between
    two writes left a trial with a host and no pid, taken for alive forever)."""
    return [socket.gethostname(), os.getpid()]


def _owner_alive(trial: optuna.trial.FrozenTrial) -> bool:
    """Whether the sweeper process that asked for ``trial`` still runs (unknown hosts: assume so)."""
    host, pid = trial.system_attrs.get(_OWNER) or (
        trial.system_attrs.get(_OWNER_HOST),
        trial.system_attrs.get(_OWNER_PID),
    )
    if host != socket.gethostname() or pid is None:
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def fail_interrupted_trials(study: optuna.Study) -> int:
    """Mark RUNNING trials whose sweeper process died as FAIL (``interrupted``); returns how many."""
    count = 0
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if not _owner_alive(trial):
            fail_trial(study, trial.number, {_INTERRUPTED: True})
            log.warning("trial %d was interrupted (its sweeper process is gone): marked failed", trial.number)
            count += 1
    return count


def counted_trials(study: optuna.Study) -> int:
    """Trials that count toward ``n_trials``: finished ones (not interrupted) and live running ones."""
    count = 0
    for trial in study.get_trials(deepcopy=False):
        if trial.state == TrialState.FAIL and trial.system_attrs.get(_INTERRUPTED):
            continue
        if trial.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL, TrialState.RUNNING):
            count += 1
    return count


def make_sqlite_folder(storage: Any) -> None:
    """Create the folder of a ``sqlite:///PATH`` storage (SQLite does not, and the sweep folder
    does not exist yet when the study is created)."""
    if isinstance(storage, str) and storage.startswith("sqlite:///"):
        Path(storage.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)


def study_lock(storage: Any) -> contextlib.AbstractContextManager[Any]:
    """A lock that parallel sweepers on one ``sqlite:///PATH`` storage take while they create the
    study (two creating a new database's tables at once: ``UNIQUE constraint failed:
    alembic_version``) and while they count it and ask for trials (without it two can both see room
    for one more trial and both ask); other storages get none (their workers may overshoot
    ``n_trials`` by up to ``n_jobs`` each)."""
    if isinstance(storage, str) and storage.startswith("sqlite:///"):
        return FileLock(storage.removeprefix("sqlite:///") + ".lock")
    return contextlib.nullcontext()


class ResumableOptunaSweeperImpl(OptunaSweeperSteps):
    """The sweep loop; see the module docstring for what differs from the plugin's ``OptunaSweeperImpl``."""

    def __init__(self, **settings: Any) -> None:
        super().__init__(
            settings["sampler"],
            settings["direction"],
            settings.get("storage"),
            settings.get("study_name"),
            settings["n_trials"],
            settings["n_jobs"],
            settings.get("max_failure_rate", 0.0),
            settings.get("search_space"),
            settings.get("custom_search_space"),
            settings.get("params"),
        )

    def sweep(self, arguments: list[str]) -> None:
        assert self.config is not None and self.launcher is not None
        distributions, fixed_params = self.parameter_space(arguments)
        if isinstance(self.sampler, functools.partial) and self.sampler.func == optuna.samplers.GridSampler:
            grid = {name: self.grid_choices(d) for name, d in distributions.items()}
            self.sampler = self.sampler(grid)
            self.n_trials = min(self.n_trials, math.prod(len(v) for v in grid.values()))

        make_sqlite_folder(self.storage)
        with study_lock(self.storage):
            study = optuna.create_study(
                study_name=self.study_name,
                storage=self.storage,
                sampler=self.sampler,
                directions=self.directions(),
                load_if_exists=True,
            )
            fail_interrupted_trials(study)
        self.job_idx = len(study.trials)  # job folders continue the numbering of a resumed study
        log.info(
            "study %s in %s: %d of %d trials done or running", study.study_name, self.storage, counted_trials(study),
            self.n_trials,
        )  # fmt: skip
        while True:
            with study_lock(self.storage):
                batch = min(self.n_jobs, self.n_trials - counted_trials(study))
                trials = [study.ask() for _ in range(max(batch, 0))]
                for trial in trials:
                    trial.set_system_attr(_OWNER, owner_record())
            if not trials:
                break
            overrides = [
                (*trial_overrides, f"++{TRIAL_NUMBER_KEY}={trial.number}")
                for trial, trial_overrides in zip(
                    trials, self.trial_overrides(trials, distributions, fixed_params), strict=True
                )
            ]
            returns = self.launcher.launch(overrides, initial_job_idx=self.job_idx)
            self.job_idx += len(returns)
            crashed = [ret for trial, ret in zip(trials, returns, strict=True) if not self._tell(study, trial, ret)]
            if len(crashed) / len(returns) > self.max_failure_rate:
                for ret in crashed:
                    ret.return_value  # noqa: B018 - re-raises the job's own error with its traceback
        self._save_results(study)

    def _tell(self, study: optuna.Study, trial: optuna.Trial, ret: JobReturn) -> bool:
        """Report a finished job to Optuna; ``False`` when the job crashed (not a recorded failure)."""
        try:
            value = ret.return_value
        except Exception as error:
            study.tell(trial, state=TrialState.FAIL)
            log.warning("trial %d crashed: %s", trial.number, error)
            return False
        record = _read_record(ret)
        if record is not None and record.status == "pruned":
            study.tell(trial, state=TrialState.PRUNED)
        elif isinstance(value, (int, float)) and math.isfinite(value):
            study.tell(trial, float(value))
        else:
            if record is not None and record.error:
                trial.set_user_attr("error", record.error)
            study.tell(trial, state=TrialState.FAIL)
        return True

    def _save_results(self, study: optuna.Study) -> None:
        complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if not complete:
            log.warning("no trial of study %s completed", study.study_name)
            return
        best = study.best_trial
        log.info("best trial %d: value %s, params %s", best.number, best.value, best.params)
        sweep_dir = Path(self.config.hydra.sweep.dir)  # absent when this worker ran no trial (others took them all)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(
            OmegaConf.create(
                {"name": "optuna", "best_trial": best.number, "best_params": best.params, "best_value": best.value}
            ),
            sweep_dir / "optimization_results.yaml",
        )


def _read_record(ret: JobReturn) -> TrialRecord | None:
    """The ``trial.json`` of a job (in its Hydra output folder), if it wrote one."""
    output_dir = OmegaConf.select(ret.hydra_cfg, "hydra.runtime.output_dir") if ret.hydra_cfg else None
    path = Path(output_dir) / TRIAL_FILE if output_dir else None
    return TrialRecord.read(path) if path is not None and path.is_file() else None
