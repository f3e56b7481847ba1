"""Faults injected into ``lf-train`` runs from inside, as extra callbacks (``+callbacks.<name>=...``).

Each injector acts once per run folder (a marker file records that it did), so a run started
again with the same command line, as a requeued job is, runs without the fault. The tests and
``bench/faults.py`` add them with :func:`inject`; the subprocess finds this module through
``PYTHONPATH`` (:data:`FAULTS_ENV`).
"""

from __future__ import annotations

import errno
import os
import signal
import time
from pathlib import Path
from typing import Any

import lightning as L
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.callbacks import Callback

from trainer.callbacks.validation_images import ValidationImages

ROOT = Path(__file__).resolve().parents[2]
FAULTS_ENV = {"PYTHONPATH": str(ROOT)}


def inject(name: str, target: str, **params: Any) -> list[str]:
    """Hydra overrides that add callback ``tests.integration.faults.<target>(**params)`` as ``callbacks.<name>``."""
    overrides = [f"+callbacks.{name}._target_=tests.integration.faults.{target}"]
    for key, value in params.items():
        text = "[" + ",".join(str(v) for v in value) + "]" if isinstance(value, (list, tuple)) else str(value)
        overrides.append(f"+callbacks.{name}.{key}={text}")
    return overrides


class _Once(Callback):
    """Acts once per run folder: ``marker`` is written when it does."""

    def __init__(self, marker: str, ranks: list[int] | None = None) -> None:
        self.marker = Path(marker)
        self.ranks = ranks

    def due(self, trainer: L.Trainer) -> bool:
        return not self.marker.exists() and (self.ranks is None or trainer.global_rank in self.ranks)

    def done(self) -> None:
        self.marker.parent.mkdir(parents=True, exist_ok=True)
        self.marker.write_text(str(os.getpid()))


class SignalAt(_Once):
    """Send ``signal`` to this process at the ``micro``-th micro-batch of the optimizer step after ``step``."""

    def __init__(self, marker: str, step: int, micro: int = 0, signal: str = "SIGTERM", **kwargs: Any) -> None:
        super().__init__(marker, **kwargs)
        self.step, self.micro, self.signal = step, micro, signal
        self._seen: tuple[int, int] = (-1, -1)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, idx: int) -> None:
        step, micro = self._seen
        self._seen = (trainer.global_step, micro + 1 if step == trainer.global_step else 0)
        if self._seen == (self.step, self.micro) and self.due(trainer):
            self.done()
            os.kill(os.getpid(), signal.Signals[self.signal])


class KillAt(_Once):
    """SIGKILL this process at the start of the optimizer step after ``step`` (a lost node, the OOM killer)."""

    def __init__(self, marker: str, step: int, **kwargs: Any) -> None:
        super().__init__(marker, **kwargs)
        self.step = step

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, idx: int) -> None:
        if trainer.global_step == self.step and self.due(trainer):
            self.done()
            os.kill(os.getpid(), signal.SIGKILL)


class StallValidation(_Once):
    """Sleep ``seconds`` at the first validation batch at or after ``step`` (a rank that hangs)."""

    def __init__(self, marker: str, step: int, seconds: float, **kwargs: Any) -> None:
        super().__init__(marker, **kwargs)
        self.step, self.seconds = step, seconds

    def on_validation_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *_: Any) -> None:
        if trainer.global_step >= self.step and self.due(trainer):
            self.done()
            time.sleep(self.seconds)


class SlowValidationImages(ValidationImages):
    """Validation images whose first sampling takes ``extra_s`` longer (long single-rank work on rank 0)."""

    def __init__(self, marker: str, extra_s: float, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.slow = _Once(marker)
        self.extra_s = extra_s

    def sample(self, trainer: L.Trainer, pl_module: L.LightningModule, prompts: list[str], seeds: list[int]):
        if self.slow.due(trainer):
            self.slow.done()
            time.sleep(self.extra_s)
        return super().sample(trainer, pl_module, prompts, seeds)


class FullDiskAt(_Once):
    """The checkpoint written at ``step`` fails halfway with ENOSPC (rank 0 writes it), as on a full disk."""

    def __init__(self, marker: str, step: int, **kwargs: Any) -> None:
        super().__init__(marker, **kwargs)
        self.step = step

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        trainer.strategy.checkpoint_io = _FullDisk(self, trainer)


class _FullDisk(TorchCheckpointIO):
    def __init__(self, fault: FullDiskAt, trainer: L.Trainer) -> None:
        self.fault, self.trainer = fault, trainer

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        if self.trainer.global_step != self.fault.step or not self.fault.due(self.trainer):
            return super().save_checkpoint(checkpoint, path, storage_options)
        self.fault.done()
        Path(path).write_bytes(b"\0" * 4096)  # a part of it was written
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


class NaNBatchAt(Callback):
    """Make every latent of the first batch of the optimizer steps after ``steps`` NaN (a bad batch)."""

    def __init__(self, steps: list[int]) -> None:
        self.steps = set(steps)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, idx: int) -> None:
        if trainer.global_step in self.steps:
            self.steps.discard(trainer.global_step)
            batch["latents"].fill_(float("nan"))


class KillLoaderWorkersAt(_Once):
    """SIGKILL the training loader's worker processes at the optimizer step after ``step``, as the
    out-of-memory killer does (``data.num_workers`` > 0)."""

    def __init__(self, marker: str, step: int, **kwargs: Any) -> None:
        super().__init__(marker, **kwargs)
        self.step = step

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, idx: int) -> None:
        if trainer.global_step == self.step and self.due(trainer):
            workers = trainer.train_dataloader._iterator._workers  # persistent workers: the loader keeps them
            assert workers, "KillLoaderWorkersAt: the training loader has no worker processes"
            self.done()
            for worker in workers:
                os.kill(worker.pid, signal.SIGKILL)
