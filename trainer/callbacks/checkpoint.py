"""Lightning's ``ModelCheckpoint``, plus a checkpoint of the final step.

Lightning saves on every ``every_n_train_steps``; when ``max_steps`` is not a multiple of it, the
last steps are lost and ``last.ckpt`` is stale (its ``on_train_end`` only saves when nothing was
saved at all). This subclass saves the final step, as a top-k checkpoint and as ``last.ckpt``.
"""

from __future__ import annotations

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint as LightningModelCheckpoint


class ModelCheckpoint(LightningModelCheckpoint):
    """``lightning.pytorch.callbacks.ModelCheckpoint`` that always saves the final training step."""

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._should_skip_saving_checkpoint(trainer):
            candidates = self._monitor_candidates(trainer)
            self._save_topk_checkpoint(trainer, candidates)
            self._save_last_checkpoint(trainer, candidates)
        super().on_train_end(trainer, pl_module)
