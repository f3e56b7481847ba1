"""The resumable Optuna sweeper, registered where Hydra looks for plugins.

``hydra/sweeper=optuna`` (``conf/hydra/sweeper/optuna.yaml``) names it:
``_target_: hydra_plugins.latentforge_sweepers.resumable_optuna.ResumableOptunaSweeper``. The logic
lives in :mod:`trainer.sweeps.optuna_sweeper`, imported when a sweep builds the sweeper: Hydra imports
this module whenever it starts (to list its plugins), so it imports nothing heavier than Hydra.
"""

from __future__ import annotations

from typing import Any

from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig


class ResumableOptunaSweeper(Sweeper):
    """Optuna sweeps that resume from their storage, share one trial budget, record failed and pruned trials.

    Takes the settings of ``conf/hydra/sweeper/optuna.yaml`` (sampler, direction, storage, study_name,
    n_trials, n_jobs, max_failure_rate, params, custom_search_space); ``n_trials`` counts the study's total.
    """

    def __init__(self, **settings: Any) -> None:
        from trainer.sweeps.optuna_sweeper import ResumableOptunaSweeperImpl

        self.sweeper = ResumableOptunaSweeperImpl(**settings)

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.sweeper.setup(hydra_context=hydra_context, task_function=task_function, config=config)

    def sweep(self, arguments: list[str]) -> None:
        self.sweeper.sweep(arguments)
