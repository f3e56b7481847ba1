"""What a run resumed from a checkpoint in a bucket needs: the remote checkpoint kept, the local copy removed.

A resume from a bucket downloads the checkpoint into ``<output_dir>/checkpoint-cache``
(:func:`trainer.checkpoint.resume.choose_checkpoint`) and gives Lightning that copy. Two things
then differ from a local resume, and this one callback handles both for every command that trains:

* **Retention keeps the remote checkpoint.** Lightning never deletes the checkpoint a run resumed from,
  but it compares with ``trainer.ckpt_path``, the local copy; our
  :class:`~trainer.callbacks.checkpoint.AtomicModelCheckpoint` is told the URL (``resumed_from``) instead.
* **The copy is removed once loaded** (small local disks): every rank has restored from it before
  training starts, so local rank 0 of each machine removes it then, with its cache entry (the version
  folder and the download lock), and local disk holds at most the checkpoint being written
  (``checkpoint-staging``). A run resumed from a checkpoint at ``max_steps`` (the same command run again
  after the run finished) trains no step and never starts training: the copy is removed when fit ends.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import Callback

from trainer.callbacks.checkpoint import AtomicModelCheckpoint


class ResumedFromBucket(Callback):
    """Keep the remote checkpoint ``url`` through retention; remove its local ``copy`` once every rank loaded it.

    Args:
        url: the remote checkpoint the run resumes from (``s3://bucket/run/checkpoints/step-0000002.ckpt``).
        copy: its downloaded copy, ``<cache>/<url key>/<version>/<name>`` (a file, or a ZeRO folder).
    """

    def __init__(self, url: str, copy: str | Path) -> None:
        self.url = url
        self.copy = Path(copy)
        self._removed = False

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        for callback in trainer.checkpoint_callbacks:
            if isinstance(callback, AtomicModelCheckpoint):
                callback.resumed_from = self.url

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._remove_copy(trainer)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._removed:  # training never started: the checkpoint was at max_steps already
            self._remove_copy(trainer)

    def _remove_copy(self, trainer: L.Trainer) -> None:
        trainer.strategy.barrier("resumed_copy_loaded")  # every rank has restored from it
        if trainer.local_rank == 0:
            shutil.rmtree(self.copy.parent.parent, ignore_errors=True)  # <cache>/<url key>: copy and lock
        self._removed = True
