"""Non-finite losses: stop the run with an error that says where (the default), or skip the optimizer step.

``on_non_finite: stop`` raises :class:`NonFiniteLossError` at the first NaN or infinite training
loss: without it a diverged run spends its remaining steps on NaN weights; in a sweep, the trial
is recorded as failed (with this message) and the sweep moves on.

``on_non_finite: skip`` is for long runs that prefer to go on past a rare bad batch: when the
gradients of an optimizer step are not all finite (a NaN or infinite loss makes them so), the
step is skipped: the weights and the optimizer state stay as they were, the step still counts
(``global_step``, the LR schedule and the data move on), and the gradients are cleared with the
next step's. Skipped steps are counted (``train/skipped_steps``, kept in checkpoints) and logged;
more than ``max_skipped_steps`` stops the run. The ranks decide together (one all-reduce), so
sharded gradients (FSDP) skip on every rank or none. DeepSpeed's engine owns its optimizer step,
so ``skip`` is refused there (its fp16 loss scaler already skips overflowing steps).
"""

from __future__ import annotations

import logging
import math
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DeepSpeedStrategy
from torch.optim import Optimizer

from lf_common.errors import ConfigError
from trainer.modules.latent_diffusion import LatentDiffusion, SkipOptimizerStep

log = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite; the run cannot recover."""


class FiniteLossGuard(Callback):
    """Stop at the first NaN/inf loss (``stop``), or skip optimizer steps with non-finite gradients (``skip``).

    Args:
        on_non_finite: ``stop`` (raise :class:`NonFiniteLossError`) or ``skip`` (skip the step, count it).
        max_skipped_steps: with ``skip``, the run stops when more steps than this were skipped.
    """

    def __init__(self, on_non_finite: Literal["stop", "skip"] = "stop", max_skipped_steps: int = 10) -> None:
        if on_non_finite not in ("stop", "skip"):
            raise ValueError(f"callbacks.finite_loss.on_non_finite={on_non_finite!r}: expected 'stop' or 'skip'")
        self.on_non_finite = on_non_finite
        self.max_skipped_steps = max_skipped_steps
        self.skipped_steps = 0

    @property
    def state_key(self) -> str:
        return "FiniteLossGuard"

    def state_dict(self) -> dict[str, Any]:
        return {"skipped_steps": self.skipped_steps}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skipped_steps = state_dict.get("skipped_steps", 0)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.on_non_finite != "skip":
            return
        if isinstance(trainer.strategy, DeepSpeedStrategy) or not isinstance(pl_module, LatentDiffusion):
            raise ConfigError(
                "callbacks.finite_loss.on_non_finite=skip needs a LatentDiffusion module outside DeepSpeed (its "
                "engine owns the optimizer step); use on_non_finite=stop"
            )

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Optimizer) -> None:
        if self.on_non_finite != "skip":
            return
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        finite = bool(torch.stack([g.isfinite().all() for g in grads]).all()) if grads else True
        if trainer.world_size > 1:
            finite = trainer.strategy.reduce_boolean_decision(finite, all=True)
        if finite:
            return
        self.skipped_steps += 1
        if self.skipped_steps > self.max_skipped_steps:
            raise NonFiniteLossError(
                f"non-finite gradients at step {trainer.global_step}: {self.skipped_steps} optimizer steps skipped, "
                f"more than callbacks.finite_loss.max_skipped_steps={self.max_skipped_steps}; the run diverged "
                "(try a lower optim.lr, gradient clipping or fp32)"
            )
        if trainer.is_global_zero:
            log.warning(
                "step %d: non-finite loss or gradients; optimizer step skipped (%d of at most %d)",
                trainer.global_step,
                self.skipped_steps,
                self.max_skipped_steps,
            )
        raise SkipOptimizerStep

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.on_non_finite == "skip":
            pl_module.log("train/skipped_steps", float(self.skipped_steps), on_step=True, on_epoch=False)
            return
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if not isinstance(loss, torch.Tensor):
            return
        value = float(loss.detach())
        if not math.isfinite(value):
            raise NonFiniteLossError(
                f"train/loss is {value} at step {trainer.global_step} (batch {batch_idx}); the run diverged "
                "(try a lower optim.lr, gradient clipping or fp32, or callbacks.finite_loss.on_non_finite=skip)"
            )
