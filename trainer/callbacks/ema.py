"""Exponential moving average of the trained weights, built on Lightning's ``WeightAveraging``.

Lightning keeps the average in a ``torch.optim.swa_utils.AveragedModel`` and restores it on
resume. This subclass changes what follows:

* the decay warm-up of ``diffusers.training_utils.EMAModel``: ``decay_n = min(decay, (1 + n) / (10 + n))``
  after ``n`` updates, so early averages are not dominated by the random initialisation;
* the model keeps its raw weights when training ends (Lightning copies the average into it).
  ``ModelCheckpoint`` writes the final ``last.ckpt`` after that copy, which would store the
  average as the raw weights too and make the checkpoint resume from the wrong weights. Export
  takes the EMA weights from the checkpoint.
* the checkpoint keeps the raw weights in ``state_dict`` and the average in ``ema_state_dict``
  (Lightning swaps them), so every strategy's loader restores the raw weights into the model;
* validation runs on the average without rounding it to the model's dtype (bf16 weights).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import WeightAveraging
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy

from lf_common.errors import ConfigError
from trainer.callbacks.lightning_private import averaged_model
from trainer.callbacks.torch_private import foreach_lerp_
from trainer.checkpoint.keys import EMA_STATE_KEY, RAW_STATE_KEY


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
            raise ConfigError(f"ema decay={decay}: expected 0 < decay < 1")
        self.decay = decay
        self.warmup = warmup
        self.every_n_steps = every_n_steps
        self.start_step = start_step
        self._stashed: list[torch.Tensor] | None = None  # the raw weights while validation runs on the average
        super().__init__(use_buffers=True, multi_avg_fn=self._update)

    @torch.no_grad()
    def _update(self, averaged: list[torch.Tensor], current: list[torch.Tensor], num_averaged: torch.Tensor) -> None:
        weight = 1.0 - ema_decay(int(num_averaged), self.decay, self.warmup)
        floating = [(a, c) for a, c in zip(averaged, current, strict=True) if a.is_floating_point()]
        if floating:  # the average keeps its own dtype (float32) when the weights are bf16/fp16
            foreach_lerp_([a for a, _ in floating], [c.to(a.dtype) for a, c in floating], weight)

    def averaged_module(self) -> L.LightningModule | None:
        """The module holding the EMA weights (``None`` before fit starts)."""
        average = averaged_model(self)
        return None if average is None else average.module

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Keep the raw weights in the model (see the module docstring)."""

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any, **kwargs: Any) -> None:
        latest_update_step = self.state_dict()["latest_update_step"]  # the optimizer step of the last update
        if trainer.global_step > latest_update_step and self.should_update(step_idx=trainer.global_step - 1):
            with full_parameters(trainer, pl_module, modify=False):
                super().on_train_batch_end(trainer, pl_module, *args, **kwargs)

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Validate the average: stash the raw weights and copy the average into the model.

        Lightning's own swap copies each way through the model's dtype, which rounds a float32
        average to bf16 when the weights are bf16 (``bf16-true``, DeepSpeed's bf16); here the average
        is only read, and the raw weights come back from the stash unchanged.
        """
        average_module = self.averaged_module()
        if average_module is None or self._stashed is not None:
            return
        with full_parameters(trainer, pl_module, modify=True):
            current = [*pl_module.parameters(), *pl_module.buffers()]
            averaged = [*average_module.parameters(), *average_module.buffers()]
            self._stashed = [tensor.detach().clone() for tensor in current]
            for tensor, average in zip(current, averaged, strict=True):
                tensor.data.copy_(average.data)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Put the raw weights back after validation."""
        if self._stashed is None:
            return
        with full_parameters(trainer, pl_module, modify=True):
            for tensor, raw in zip([*pl_module.parameters(), *pl_module.buffers()], self._stashed, strict=True):
                tensor.data.copy_(raw)
        self._stashed = None

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        """Keep the raw weights in ``state_dict`` and the average in ``EMA_STATE_KEY``, under every strategy.

        ``state_dict`` is what each strategy loads back into the model on resume (Lightning's own
        restore, FSDP's loader, DeepSpeed's engine), so it must hold the raw weights; Lightning's
        ``WeightAveraging`` layout (average in ``state_dict``) made FSDP resume the average as raw weights.
        """
        super().on_save_checkpoint(trainer, pl_module, checkpoint)
        if RAW_STATE_KEY in checkpoint:  # Lightning put the average in state_dict, the raw weights here
            checkpoint[EMA_STATE_KEY] = checkpoint["state_dict"]
            checkpoint["state_dict"] = checkpoint.pop(RAW_STATE_KEY)

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        average = averaged_model(self)
        if EMA_STATE_KEY not in checkpoint or average is None:
            super().on_load_checkpoint(trainer, pl_module, checkpoint)  # Lightning's layout (older checkpoints)
            return
        # the strategy has loaded the raw weights from state_dict already; only the average is restored here
        state = {"module." + name: value for name, value in checkpoint[EMA_STATE_KEY].items()}
        state |= checkpoint.get("averaging_state", {})
        average.load_state_dict(state)

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
