"""Exponential moving average of the trained weights, built on Lightning's ``WeightAveraging``.

Lightning keeps the average in a ``torch.optim.swa_utils.AveragedModel``, swaps it in for
validation, stores it as the checkpoint's ``state_dict`` (the raw weights go to
``current_model_state``) and restores both on resume. This subclass changes two things:

* the decay warm-up of ``diffusers.training_utils.EMAModel``: ``decay_n = min(decay, (1 + n) / (10 + n))``
  after ``n`` updates, so early averages are not dominated by the random initialisation;
* the model keeps its raw weights when training ends (Lightning copies the average into it).
  ``ModelCheckpoint`` writes the final ``last.ckpt`` after that copy, which would store the
  average as the raw weights too and make the checkpoint resume from the wrong weights. Export
  takes the EMA weights from the checkpoint.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import WeightAveraging
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy

EMA_STATE_KEY = "ema_state_dict"
"""Where a DeepSpeed checkpoint (its client state) keeps the EMA weights (``unet.*`` keys)."""


def ema_decay(num_averaged: int, decay: float, warmup: bool) -> float:
    """The decay used for the update after ``num_averaged`` earlier updates."""
    if not warmup:
        return decay
    return min(decay, (1 + num_averaged) / (10 + num_averaged))


class EMA(WeightAveraging):
    """EMA of parameters and buffers, updated every ``every_n_steps`` optimizer steps.

    Args:
        decay: the EMA decay (0.999 keeps about the last 1,000 updates).
        warmup: use the ``(1 + n) / (10 + n)`` warm-up of the decay.
        every_n_steps: update after every n-th optimizer step.
        start_step: first optimizer step (0-based) that updates the average.
    """

    def __init__(self, decay: float = 0.999, warmup: bool = True, every_n_steps: int = 1, start_step: int = 0) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"ema decay={decay}: expected 0 < decay < 1")
        self.decay = decay
        self.warmup = warmup
        self.every_n_steps = every_n_steps
        self.start_step = start_step
        super().__init__(use_buffers=True, multi_avg_fn=self._update)

    @torch.no_grad()
    def _update(self, averaged: list[torch.Tensor], current: list[torch.Tensor], num_averaged: torch.Tensor) -> None:
        weight = 1.0 - ema_decay(int(num_averaged), self.decay, self.warmup)
        floating = [(a, c) for a, c in zip(averaged, current, strict=True) if a.is_floating_point()]
        if floating:
            torch._foreach_lerp_([a for a, _ in floating], [c for _, c in floating], weight)

    def averaged_module(self) -> L.LightningModule | None:
        """The module holding the EMA weights (``None`` before fit starts)."""
        return None if self._average_model is None else self._average_model.module

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Keep the raw weights in the model (see the module docstring)."""

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any, **kwargs: Any) -> None:
        if trainer.global_step > self._latest_update_step and self.should_update(step_idx=trainer.global_step - 1):
            with full_parameters(trainer, pl_module, modify=False):
                super().on_train_batch_end(trainer, pl_module, *args, **kwargs)

    def _swap_models(self, pl_module: L.LightningModule) -> None:
        with full_parameters(pl_module.trainer, pl_module, modify=True):
            super()._swap_models(pl_module)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(trainer, pl_module, checkpoint)
        if isinstance(trainer.strategy, DeepSpeedStrategy) and "current_model_state" in checkpoint:
            checkpoint[EMA_STATE_KEY] = checkpoint["state_dict"]
            del checkpoint["current_model_state"]

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        if EMA_STATE_KEY not in checkpoint or self._average_model is None:
            super().on_load_checkpoint(trainer, pl_module, checkpoint)
            return
        # DeepSpeed: the engine has loaded the raw weights already; only the average is restored here.
        state = {"module." + name: value for name, value in checkpoint[EMA_STATE_KEY].items()}
        state |= checkpoint.get("averaging_state", {})
        self._average_model.load_state_dict(state)

    def should_update(self, step_idx: int | None = None, epoch_idx: int | None = None) -> bool:
        return step_idx is not None and step_idx >= self.start_step and step_idx % self.every_n_steps == 0


@contextlib.contextmanager
def full_parameters(trainer: L.Trainer, pl_module: L.LightningModule, modify: bool) -> Iterator[None]:
    """Make ``pl_module``'s parameters whole on every rank for the body (ZeRO-3, FSDP); else no-op.

    Args:
        modify: the body writes the parameters (rank 0's values are kept and re-partitioned).
    """
    strategy = trainer.strategy
    if isinstance(strategy, DeepSpeedStrategy) and strategy.zero_stage_3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(pl_module.parameters()), modifier_rank=0 if modify else None):
            yield
    elif isinstance(strategy, FSDPStrategy) and strategy.model is not None:
        from torch.distributed.fsdp import FullyShardedDataParallel

        with FullyShardedDataParallel.summon_full_params(strategy.model, writeback=modify):
            yield
    else:
        yield
