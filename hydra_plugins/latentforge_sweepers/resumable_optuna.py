"""The resumable Optuna sweeper, registered where Hydra looks for plugins.

``hydra.sweeper._target_: hydra_plugins.latentforge_sweepers.resumable_optuna.ResumableOptunaSweeper``;
the logic lives in :mod:`trainer.sweeps.optuna_sweeper`.
"""

from __future__ import annotations

from typing import Any

from hydra.types import HydraContext, TaskFunction
from hydra_plugins.hydra_optuna_sweeper.optuna_sweeper import OptunaSweeper
from omegaconf import DictConfig

from trainer.sweeps.optuna_sweeper import ResumableOptunaSweeperImpl


class ResumableOptunaSweeper(OptunaSweeper):
    """Optuna sweeps that resume from their storage, record failed/pruned trials and go on.

    Takes the same settings as ``hydra/sweeper=optuna`` (sampler, direction, storage, study_name,
    n_trials, n_jobs, max_failure_rate, params, ...); ``n_trials`` counts the study's total.
    """

    def __init__(self, **settings: Any) -> None:
        self.sweeper = ResumableOptunaSweeperImpl(**settings)

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.sweeper.setup(hydra_context=hydra_context, task_function=task_function, config=config)

    def sweep(self, arguments: list[str]) -> None:
        self.sweeper.sweep(arguments)
