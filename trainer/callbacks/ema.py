"""Exponential moving average of the parameters that train (a LoRA run's: its adapters only).

The average is a float32 copy of each parameter with ``requires_grad`` at fit start, on that parameter's device (the
training device; ``device="cpu"``: in host memory), never sharded: a full fine-tune averages the UNet (and a trained
text encoder), a LoRA run its adapters, textual inversion its new embedding rows. Frozen weights and buffers are not
copied: they do not change, so the EMA model is the average of what trains with everything else as it is.
Lightning's ``WeightAveraging`` (a ``torch.optim.swa_utils.AveragedModel``) deep-copies the whole module, frozen
UNet and encoders included; diffusers' ``EMAModel`` tracks a parameter list but keeps the average in the parameters'
own dtype (bf16 under ``bf16-true``) and its state as an unnamed list. Hence this callback:

* the decay warm-up of ``diffusers.training_utils.EMAModel``: ``decay_n = min(decay, (1 + n) / (10 + n))``
  after ``n`` updates (the first update copies the weights), so early averages are not dominated by the
  initialisation;
* the checkpoint keeps the raw weights in ``state_dict`` (what every strategy loads back into the model) and
  the average of the trained parameters in ``ema_state_dict`` (``EMA_STATE_KEY``, the same names as
  ``state_dict``); :func:`trainer.checkpoint.reading.load_checkpoint` completes it with the frozen weights for
  export and sampling. A checkpoint of the earlier full-module EMA (or of Lightning's ``WeightAveraging``)
  resumes with the trained parameters' part of its average;
* validation runs on the average without rounding it to the model's dtype (bf16 weights), and the raw weights
  come back unchanged afterwards; the model keeps its raw weights when training ends.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import lightning as L
import torch
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy
from lightning.pytorch.utilities import rank_zero_warn

from lf_common.errors import ConfigError, DataError
from trainer.callbacks.torch_private import foreach_lerp_
from trainer.checkpoint.keys import EMA_STATE_KEY, RAW_STATE_KEY

AVERAGING_STATE_KEY = "averaging_state"
"""The checkpoint's ``{"n_averaged": tensor}``: how many updates the average holds (Lightning's key)."""


def ema_decay(num_averaged: int, decay: float, warmup: bool) -> float:
    """The decay used for the update after ``num_averaged`` earlier updates."""
    if not warmup:
        return decay
    return min(decay, (1 + num_averaged) / (10 + num_averaged))


@torch.no_grad()
def update_average(averaged: list[torch.Tensor], current: list[torch.Tensor], weight: float) -> None:
    """``a += weight * (c - a)`` for each pair, in the average's dtype (float32 when the weights are bf16/fp16) and on
    its device."""
    if averaged:
        ends = [c.detach().to(a.device, a.dtype) for a, c in zip(averaged, current, strict=True)]
        foreach_lerp_(averaged, ends, weight)


class EMA(L.Callback):
    """EMA of the trained parameters, updated every ``every_n_steps`` optimizer steps.

    Args:
        decay: the EMA decay (0.999 keeps about the last 1,000 updates).
        warmup: use the ``(1 + n) / (10 + n)`` warm-up of the decay.
        every_n_steps: update after every n-th optimizer step.
        start_step: first optimizer step (0-based) that updates the average.
        device: where the average lives: ``None``, beside each parameter (the training device); ``"cpu"``, in
            host memory (a full fine-tune whose EMA does not fit on the GPU; each update copies the weights there).
    """

    def __init__(
        self,
        decay: float = 0.999,
        warmup: bool = True,
        every_n_steps: int = 1,
        start_step: int = 0,
        device: str | None = None,
    ) -> None:
        if not 0.0 < decay < 1.0:
            raise ConfigError(f"ema decay={decay}: expected 0 < decay < 1")
        self.decay = decay
        self.warmup = warmup
        self.every_n_steps = every_n_steps
        self.start_step = start_step
        self.device = None if device is None else torch.device(device)
        self._module_params: list[tuple[str, torch.nn.Parameter]] = []  # every parameter, named before wrapping
        self.names: list[str] = []  # the trained parameters' names (state_dict keys), in the module's order
        self._params: list[torch.nn.Parameter] = []  # ... and the parameters themselves
        self.average: list[torch.Tensor] | None = None  # float32, one per trained parameter (from fit start)
        self.num_averaged = 0
        self._latest_update_step = 0  # the optimizer step of the last update
        self._restored: tuple[dict[str, torch.Tensor], int] | None = None  # loaded before fit start
        self._stashed: list[torch.Tensor] | None = None  # the raw weights while validation runs on the average

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Name the parameters while the module is as built (no strategy wrapper has renamed them yet)."""
        if stage == "fit":
            self._module_params = list(pl_module.named_parameters())

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Take the parameters that train (``requires_grad``) and copy them as the average (float32)."""
        live = {id(p) for p in pl_module.parameters()}
        trained = [(name, p) for name, p in self._module_params if p.requires_grad]
        if any(id(p) not in live for _, p in trained):
            raise ConfigError(
                f"callbacks.ema: strategy {type(trainer.strategy).__name__} replaced the module's parameters, so the "
                "EMA cannot follow them; set callbacks.ema=null"
            )
        self.names, self._params = [name for name, _ in trained], [p for _, p in trained]
        with full_parameters(trainer, pl_module, self._params, modify=False):
            self.average = [p.detach().to(self.device or p.device, torch.float32, copy=True) for p in self._params]
        self.num_averaged = 0  # the first update copies the weights (a restored average replaces this one)
        self._apply_restored(trainer)

    def averaged_state(self) -> dict[str, torch.Tensor]:
        """The average by name (``unet.*`` and the like, as in ``state_dict``); empty before fit starts."""
        return dict(zip(self.names, self.average or [], strict=False))

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any, **kwargs: Any) -> None:
        step = trainer.global_step
        if self.average is None or step <= self._latest_update_step or not self.should_update(step_idx=step - 1):
            return
        with full_parameters(trainer, pl_module, self._params, modify=False):
            if self.num_averaged == 0:
                for average, param in zip(self.average, self._params, strict=True):
                    average.copy_(param.detach())
            else:
                update_average(self.average, self._params, 1.0 - ema_decay(self.num_averaged, self.decay, self.warmup))
        self.num_averaged += 1
        self._latest_update_step = step

    def should_update(self, step_idx: int | None = None, epoch_idx: int | None = None) -> bool:
        """Whether the optimizer step ``step_idx`` (0-based) updates the average."""
        return step_idx is not None and step_idx >= self.start_step and step_idx % self.every_n_steps == 0

    @contextlib.contextmanager
    def average_weights(self) -> Iterator[None]:
        """The average in the trained parameters for the body, the raw weights back after (this rank only: for
        strategies whose ranks hold whole parameters; under ZeRO-3/FSDP use it inside :func:`full_parameters`)."""
        if self.average is None or self._stashed is not None:
            yield
            return
        self._swap_in()
        try:
            yield
        finally:
            self._swap_out()

    def _swap_in(self) -> None:
        self._stashed = [p.detach().clone() for p in self._params]
        with torch.no_grad():
            for param, average in zip(self._params, self.average or [], strict=True):
                param.copy_(average)

    def _swap_out(self) -> None:
        with torch.no_grad():
            for param, raw in zip(self._params, self._stashed or [], strict=True):
                param.copy_(raw)
        self._stashed = None

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Validate the average: stash the raw weights and copy the average into the model (read, not rounded)."""
        if self.average is None or self._stashed is not None:
            return
        with full_parameters(trainer, pl_module, self._params, modify=True):
            self._swap_in()

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Put the raw weights back after validation."""
        if self._stashed is None:
            return
        with full_parameters(trainer, pl_module, self._params, modify=True):
            self._swap_out()

    def state_dict(self) -> dict[str, Any]:
        return {"latest_update_step": self._latest_update_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._latest_update_step = state_dict["latest_update_step"]

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        """The average of the trained parameters in ``EMA_STATE_KEY``; ``state_dict`` keeps the raw weights."""
        if self.average is None:
            return
        checkpoint[EMA_STATE_KEY] = self.averaged_state()
        checkpoint[AVERAGING_STATE_KEY] = {"n_averaged": torch.tensor(self.num_averaged, dtype=torch.long)}

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        """Restore the average: this layout, the earlier full-module one (its trained parameters' part), or
        Lightning's ``WeightAveraging`` layout (average in ``state_dict``; the raw weights are loaded here)."""
        if EMA_STATE_KEY in checkpoint:
            averaged = checkpoint[EMA_STATE_KEY]
        elif RAW_STATE_KEY in checkpoint and AVERAGING_STATE_KEY in checkpoint:
            averaged = checkpoint["state_dict"]
            pl_module.load_state_dict(checkpoint[RAW_STATE_KEY])  # the strategy loaded the average as raw weights
        else:
            rank_zero_warn("callbacks.ema: the checkpoint holds no EMA; the average starts from the resumed weights")
            return
        count = checkpoint.get(AVERAGING_STATE_KEY, {}).get("n_averaged", 0)
        self._restored = (averaged, int(count))
        if self.average is not None:  # DeepSpeed and FSDP restore after fit start
            self._apply_restored(trainer)

    def _apply_restored(self, trainer: L.Trainer) -> None:
        if self._restored is None or self.average is None:
            return
        averaged, count = self._restored
        missing = [name for name in self.names if name not in averaged]
        if missing:
            raise DataError(
                f"{trainer.ckpt_path}: key '{EMA_STATE_KEY}' has no average of '{missing[0]}' "
                f"({len(missing)} trained parameters missing): a checkpoint of another setup; resume with "
                "callbacks.ema=null or from a checkpoint of this run"
            )
        with torch.no_grad():
            for average, name in zip(self.average, self.names, strict=True):
                average.copy_(averaged[name])
        self.num_averaged = count
        self._restored = None


@contextlib.contextmanager
def full_parameters(
    trainer: L.Trainer, pl_module: L.LightningModule, params: list[torch.nn.Parameter], modify: bool
) -> Iterator[None]:
    """Make ``params`` (of ``pl_module``) whole on every rank for the body (ZeRO-3, FSDP); else no-op.

    Args:
        params: the parameters the body reads or writes (ZeRO-3 gathers these; FSDP the whole module).
        modify: the body writes the parameters (rank 0's values are kept and re-partitioned).
    """
    strategy = trainer.strategy
    if isinstance(strategy, DeepSpeedStrategy) and strategy.zero_stage_3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(params, modifier_rank=0 if modify else None):
            yield
    elif isinstance(strategy, FSDPStrategy) and strategy.model is not None:
        from torch.distributed.fsdp import FullyShardedDataParallel

        with FullyShardedDataParallel.summon_full_params(strategy.model, writeback=modify):
            yield
    else:
        yield
