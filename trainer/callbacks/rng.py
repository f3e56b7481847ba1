"""Save every rank's random number generator states in checkpoints; restore them on resume.

Lightning restores model, optimizer, schedulers, loop counters and callback states, but not the
RNGs that draw the noise, timesteps and caption dropout of each training step. This callback
stores the states of torch (CPU and CUDA), numpy and Python ``random`` of every rank (gathered to
the rank that writes the checkpoint) and puts them back on each rank just before the first
training step after a resume: the point where the uninterrupted run had the same states (data
loading in between draws from its own seeded generators, not from these).

States are stored as tensors, ints and tuples only, so checkpoints load with ``weights_only=True``.
"""

from __future__ import annotations

import logging
import random
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback

log = logging.getLogger(__name__)


def capture_rng_state() -> dict[str, Any]:
    """This process's RNG states (torch CPU and CUDA, numpy, Python), as weights-only-safe values."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)),
        "python": random.getstate(),
    }


def restore_rng_state(state: dict[str, Any]) -> None:
    """Set this process's RNG states from :func:`capture_rng_state`'s output."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))


class RNGState(Callback):
    """Checkpoints the RNG states of every rank and restores them before the next training step."""

    def __init__(self) -> None:
        self._pending: dict[str, Any] | None = None

    @property
    def state_key(self) -> str:
        return "RNGState"

    def state_dict(self) -> dict[str, Any]:
        state = capture_rng_state()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            ranks: list[Any] = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(ranks, state)
        else:
            ranks = [state]
        return {"ranks": ranks}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = state_dict

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._pending is None:
            return
        ranks = self._pending["ranks"]
        self._pending = None
        if len(ranks) != trainer.world_size:
            log.warning(
                "RNG states not restored: the checkpoint has %d rank(s), this run %d", len(ranks), trainer.world_size
            )
            return
        restore_rng_state(ranks[trainer.global_rank])
        if trainer.is_global_zero:
            log.info("RNG states of %d rank(s) restored at step %d", len(ranks), trainer.global_step)
