"""A Hydra sweeper that drives Optuna: resumable, one budget for parallel workers, aware of failed and pruned trials.

Hydra loads it as ``hydra_plugins.latentforge_sweepers.resumable_optuna.ResumableOptunaSweeper``
(``hydra/sweeper=optuna``, ``conf/hydra/sweeper/optuna.yaml``; plugins must live in that namespace);
use it through ``conf/hparams_search/*.yaml`` (``lf-train -m hparams_search=lr_optuna``). Its settings
are hydra-optuna-sweeper's: ``sampler`` (``hydra/sweeper/sampler=tpe|random|grid|...``), ``direction``,
``storage``, ``study_name``, ``n_trials``, ``n_jobs``, ``max_failure_rate``, ``params`` (Hydra's override
grammar, read by :mod:`trainer.sweeps.search_space`) and ``custom_search_space``. What differs from that
plugin's loop:

- ``n_trials`` is the study's total: a sweep restarted on the same storage runs only the missing
  trials. Trials left ``RUNNING`` by a killed sweeper process on this host are marked failed
  (``interrupted``) and not counted; the running trials of live workers (other processes sharing
  the storage, ``launch/sweep_gpus.sh``) are counted, so parallel workers share one budget
  (:mod:`trainer.sweeps.study`).
- A trial that diverged, ran out of memory or missed its metric (``trial.json`` status
  ``failed``) is told to Optuna as FAIL and the sweep goes on; a pruned one as PRUNED.
- Each job gets ``++optuna_trial_number=N``, which :class:`trainer.callbacks.optuna_pruning.OptunaPruning`
  uses to report intermediate values and to stop hopeless trials.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import optuna
from hydra.core.plugins import Plugins
from hydra.core.utils import JobReturn
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from hydra.utils import get_method
from omegaconf import DictConfig, OmegaConf
from optuna.trial import TrialState

from lf_common.errors import ConfigError
from trainer.sweeps.search_space import SearchSpace, check_resumable, grid_choices, parse_search_space
from trainer.sweeps.study import (
    OWNER,
    counted_trials,
    fail_interrupted_trials,
    has_study_lock,
    open_storage,
    owner_record,
    study_lock,
    tell,
)
from trainer.sweeps.trial import DIRECTIONS, TRIAL_FILE, TrialRecord

log = logging.getLogger(__name__)

TRIAL_NUMBER_KEY = "optuna_trial_number"


def _one_direction(direction: str | Sequence[str]) -> str:
    """The study's one direction: ``lf-train`` returns one metric (``optimized_metric``)."""
    directions = [direction] if isinstance(direction, str) else list(direction)
    if len(directions) != 1 or directions[0] not in DIRECTIONS:
        raise ConfigError(f"hydra.sweeper.direction must be one of {DIRECTIONS} (one objective), got {direction!r}")
    return directions[0]


class ResumableOptunaSweeperImpl:
    """The sweep; see the module docstring. Built by Hydra from ``hydra.sweeper`` (objects already built).

    Args:
        sampler: an ``optuna.samplers`` instance, or a ``functools.partial`` of ``GridSampler`` (its grid is
            the search space's values); ``None``: Optuna's default (TPE).
        direction: ``minimize`` or ``maximize``.
        storage: the study's database URL (``sqlite:///PATH``; ``None``: in memory, nothing resumes).
        study_name: the study's name in the storage.
        n_trials: trials of the study in total, across restarts and parallel workers.
        n_jobs: trials asked for and launched together (one launcher call).
        max_failure_rate: the share of crashed jobs in a batch (not recorded trial failures) that stops the sweep.
        params: the search space, ``{key: override value}`` in Hydra's grammar.
        custom_search_space: a function ``(config, trial) -> None`` (by its dotted name) that suggests more
            parameters on each trial, e.g. ones that depend on others.
    """

    def __init__(
        self,
        sampler: Any = None,
        direction: str | Sequence[str] = "minimize",
        storage: Any = None,
        study_name: str | None = None,
        n_trials: int = 20,
        n_jobs: int = 1,
        max_failure_rate: float = 0.0,
        params: Mapping[str, Any] | None = None,
        custom_search_space: str | None = None,
    ) -> None:
        if not 0.0 <= max_failure_rate <= 1.0:
            raise ConfigError(f"hydra.sweeper.max_failure_rate must be within [0, 1], got {max_failure_rate}")
        if n_jobs < 1:
            raise ConfigError(f"hydra.sweeper.n_jobs must be 1 or more, got {n_jobs}")
        self.sampler = sampler
        self.direction = _one_direction(direction)
        self.storage = storage
        self.study_name = study_name
        self.n_trials = n_trials
        self.n_jobs = n_jobs
        self.max_failure_rate = max_failure_rate
        self.params = params
        self.extend_search_space: Callable[[DictConfig, optuna.Trial], None] | None = (
            get_method(custom_search_space) if custom_search_space else None
        )
        self.config: DictConfig | None = None
        self.launcher: Launcher | None = None
        self.job_idx = 0

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        """Keep the composed config and build the launcher (``hydra/launcher``) that runs the trials."""
        self.config = config
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )

    def sweep(self, arguments: list[str]) -> None:
        """Run the study's missing trials, batch by batch, then write ``optimization_results.yaml``.

        Args:
            arguments: the command line's overrides (sweeps in them join ``params``).
        """
        assert self.config is not None and self.launcher is not None, "setup() first"
        space = parse_search_space(self.params, arguments)
        sampler = self.sampler
        if isinstance(sampler, functools.partial) and sampler.func is optuna.samplers.GridSampler:
            grid = grid_choices(space.distributions)
            sampler = sampler(grid)
            self.n_trials = min(self.n_trials, math.prod(len(values) for values in grid.values()))
            log.info("grid sampler: %d trials at most", self.n_trials)

        with study_lock(self.storage):
            storage = open_storage(self.storage)
            study = optuna.create_study(
                study_name=self.study_name,
                storage=storage,
                sampler=sampler,
                direction=self.direction,
                load_if_exists=True,
            )
            fail_interrupted_trials(study, storage, locked=has_study_lock(self.storage))
        recorded = {key: d for trial in study.get_trials(deepcopy=False) for key, d in trial.distributions.items()}
        check_resumable(study.study_name, recorded, space)
        self.job_idx = len(study.trials)  # job folders continue the numbering of a resumed study
        log.info(
            "study %s in %s (%s): %d of %d trials done or running", study.study_name, self.storage,
            type(study.sampler).__name__, counted_trials(study), self.n_trials,
        )  # fmt: skip
        while True:
            with study_lock(self.storage):
                batch = min(self.n_jobs, self.n_trials - counted_trials(study))
                trials = [self._ask(study, space) for _ in range(max(batch, 0))]
            if not trials:
                break
            overrides = [(*space.overrides(trial.params), f"++{TRIAL_NUMBER_KEY}={trial.number}") for trial in trials]
            returns = self.launcher.launch(overrides, initial_job_idx=self.job_idx)
            self.job_idx += len(returns)
            crashed = [ret for trial, ret in zip(trials, returns, strict=True) if not _tell(study, trial, ret)]
            if len(crashed) / len(returns) > self.max_failure_rate:
                for ret in crashed:
                    ret.return_value  # noqa: B018 - re-raises the job's own error with its traceback
        self._save_results(study)

    def _ask(self, study: optuna.Study, space: SearchSpace) -> optuna.Trial:
        """A new trial with its parameters sampled, its owner and fixed overrides recorded on it."""
        trial = study.ask(fixed_distributions=space.distributions)
        trial.set_user_attr(OWNER, owner_record())
        for key, value in space.fixed_values().items():
            trial.set_user_attr(key, value)
        if self.extend_search_space is not None:
            assert self.config is not None
            self.extend_search_space(self.config, trial)
        overlap = sorted(trial.params.keys() & space.fixed.keys())
        if overlap:
            raise ConfigError(f"hydra.sweeper.custom_search_space suggests {overlap}, which the overrides fix")
        return trial

    def _save_results(self, study: optuna.Study) -> None:
        """``optimization_results.yaml`` in the sweep folder: the best trial's number, parameters and value."""
        assert self.config is not None
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


def _tell(study: optuna.Study, trial: optuna.Trial, ret: JobReturn) -> bool:
    """Report a finished job to Optuna; ``False`` when the job crashed (not a recorded failure)."""
    try:
        value = ret.return_value
    except Exception as error:
        tell(study, trial, state=TrialState.FAIL)
        log.warning("trial %d crashed: %s", trial.number, error)
        return False
    record = _read_record(ret)
    if record is not None and record.status == "pruned":
        tell(study, trial, state=TrialState.PRUNED)
    elif isinstance(value, (int, float)) and math.isfinite(value):
        tell(study, trial, values=float(value))
    else:
        if record is not None and record.error:
            trial.set_user_attr("error", record.error)
        tell(study, trial, state=TrialState.FAIL)
    return True


def _read_record(ret: JobReturn) -> TrialRecord | None:
    """The ``trial.json`` of a job (in its Hydra output folder), if it wrote one."""
    output_dir = OmegaConf.select(ret.hydra_cfg, "hydra.runtime.output_dir") if ret.hydra_cfg else None
    path = Path(output_dir) / TRIAL_FILE if output_dir else None
    return TrialRecord.read(path) if path is not None and path.is_file() else None
