"""Remove the local copy of a remote checkpoint once the run has resumed from it (small local disks).

A resume from a bucket downloads the checkpoint into ``<output_dir>/checkpoint-cache``
(:func:`trainer.checkpoint.remote.resolve_remote_checkpoint`); every rank has loaded it before
training starts, so the copy is removed then, and local disk holds at most the checkpoint being
written (``checkpoint-staging``).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import Callback


class RemoveResumedCopy(Callback):
    """At the start of training, remove ``copy`` (a downloaded checkpoint file or folder) on each machine.

    Args:
        copy: the local copy the run resumed from.
    """

    def __init__(self, copy: str | Path) -> None:
        self.copy = Path(copy)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        trainer.strategy.barrier("resumed_copy_loaded")  # every rank has restored from it
        if trainer.local_rank == 0:
            shutil.rmtree(self.copy.parent, ignore_errors=True)  # <cache>/<url key>/<version>/<name>
