"""Stop a run at the first non-finite training loss, with an error that says where."""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite; the run cannot recover."""


class FiniteLossGuard(Callback):
    """Raise :class:`NonFiniteLossError` when a training step's loss is NaN or ±inf.

    Without it a diverged run spends its remaining steps on NaN weights; in a sweep, the trial
    is recorded as failed (with this message) and the sweep moves on to the next one.
    """

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if not isinstance(loss, torch.Tensor):
            return
        value = float(loss.detach())
        if not math.isfinite(value):
            raise NonFiniteLossError(
                f"train/loss is {value} at step {trainer.global_step} (batch {batch_idx}); the run diverged "
                "(try a lower optim.lr, gradient clipping or fp32)"
            )
