"""Stop hopeless trials of an Optuna sweep early (Optuna's pruners, fed by the validation metric)."""

from __future__ import annotations

import logging

import lightning as L
import optuna
from lightning.pytorch.callbacks import Callback

from lf_common.errors import ConfigError
from trainer.callbacks.optuna_private import trial_handle

log = logging.getLogger(__name__)


class OptunaPruning(Callback):
    """Report ``monitor`` to the trial after each validation; raise ``optuna.TrialPruned`` when the
    study's pruner says so (the sweep records the trial as pruned and goes on).

    Uses Optuna's public ``Trial.report`` and ``Trial.should_prune`` (what optuna-integration's Lightning
    callback does, here for a trial that the sweeper asked for, reached by its number). Rank 0 talks to
    the storage and broadcasts the decision, so every rank stops together.

    Args:
        storage: the study's database URL (``hydra.sweeper.storage``).
        study_name: the study (``hydra.sweeper.study_name``).
        trial_number: this job's trial (``optuna_trial_number``, set by
            the resumable Optuna sweeper, ``conf/hparams_search``); ``None`` outside a sweep:
            the callback does nothing.
        monitor: the metric to report, e.g. ``val/loss``.
        pruner: an ``optuna.pruners`` instance (default: ``MedianPruner()``).
    """

    def __init__(
        self,
        storage: str | None,
        study_name: str | None,
        trial_number: int | None,
        monitor: str,
        pruner: optuna.pruners.BasePruner | None = None,
    ) -> None:
        if trial_number is not None and (not storage or not study_name):
            raise ConfigError(
                "callbacks.optuna_pruning: a trial reports to its study through hydra.sweeper.storage "
                "(a database URL, e.g. sqlite:///${hydra.sweep.dir}/optuna.db) and hydra.sweeper.study_name; set both"
            )
        self.storage = storage
        self.study_name = study_name
        self.trial_number = trial_number
        self.monitor = monitor
        self.pruner = pruner or optuna.pruners.MedianPruner()
        self._trial: optuna.Trial | None = None

    def _get_trial(self) -> optuna.Trial:
        if self._trial is None:
            assert self.trial_number is not None and self.study_name is not None
            storage = optuna.storages.RDBStorage(self.storage)
            study = optuna.load_study(study_name=self.study_name, storage=storage, pruner=self.pruner)
            self._trial = trial_handle(study, storage, self.trial_number)
        return self._trial

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.trial_number is None or trainer.sanity_checking:
            return
        value = trainer.callback_metrics.get(self.monitor)
        prune = False
        if trainer.is_global_zero and value is not None:
            trial = self._get_trial()
            trial.report(float(value), step=trainer.global_step)
            prune = trial.should_prune()
        if trainer.strategy.broadcast(prune, src=0):
            shown = f"{float(value):.4g}" if value is not None else "?"
            raise optuna.TrialPruned(f"{self.monitor}={shown} at step {trainer.global_step}")
