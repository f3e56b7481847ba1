"""Schedule-free optimizers (``optim=schedule_free_adamw``) keep training and evaluation weights apart: the
module switches to the training weights before each batch and to the evaluation weights after each optimizer
step, so validation, the EMA, checkpoints and exports see the evaluation weights."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.optim import Optimizer


def schedule_free_optimizers(optimizers: Sequence[Optimizer]) -> list[Optimizer]:
    """The schedule-free optimizers among ``optimizers``: schedulefree's classes mark their parameter groups
    with ``train_mode`` and keep training and evaluation weights apart (``train()``/``eval()``). DeepSpeed's
    optimizers wrap the configured one (and are no ``torch.optim.Optimizer``): schedule-free is refused there."""
    return [o for o in optimizers if isinstance(o, torch.optim.Optimizer) and "train_mode" in o.defaults]


def use_training_weights(optimizers: Sequence[Optimizer]) -> None:
    """Switch every schedule-free optimizer among ``optimizers`` to its training weights (no-op when there)."""
    for optimizer in schedule_free_optimizers(optimizers):
        optimizer.train()  # type: ignore[attr-defined]


def use_evaluation_weights(optimizers: Sequence[Optimizer]) -> None:
    """Switch every schedule-free optimizer among ``optimizers`` to its evaluation weights (for what follows an
    optimizer step: the EMA, a checkpoint, validation)."""
    for optimizer in schedule_free_optimizers(optimizers):
        optimizer.eval()  # type: ignore[attr-defined]
