"""Lightning's ``ModelCheckpoint``, with atomic writes, every-N-th retention and the final step.

* **Atomic**: each checkpoint (a file, or a DeepSpeed folder of shards) is written under
  ``<name>.partial`` and renamed to its name once every rank has finished writing, so a crash
  never leaves a half-written checkpoint under a final name (``trainer.checkpoint.resume`` tells
  complete from damaged ones when resuming).
* **Storage faults**: a write that fails (a full disk, a failing device) removes its partial
  checkpoint and stops the run with a :class:`~lf_common.errors.StorageError` that names the path,
  the space needed and free, and the previous checkpoint, which is complete and resumes; every rank
  stops with it.
* **No timeout while rank 0 writes**: under DDP rank 0 writes alone; the other ranks wait for it
  through the store while the file grows (``trainer.faults.ranks.single_rank_work``), not in a
  process-group barrier whose timeout a large checkpoint on slow storage would outlast.
* **Retention**: ``save_top_k`` with ``monitor: step`` keeps the newest K; ``keep_every_n_steps``
  also keeps every checkpoint whose step is a multiple of N (they are never deleted).
* **No rewrite on resume**: Lightning does not restore which step it saved last, so after a
  resume with gradient accumulation the first micro-batch (still at the resumed step) saved that
  step again, over the checkpoint it resumed from and ``last.ckpt``, with one micro-batch consumed
  whose gradient no checkpoint holds. The resumed step counts as saved here.
* **A bucket** (``dirpath=s3://...``, any fsspec URL): each checkpoint is written as above to a local
  staging folder (``staging_dir``), uploaded (:mod:`trainer.checkpoint.remote`: a file is one object,
  a DeepSpeed folder's ``latest`` tag goes last) and removed locally; retention deletes remote ones.
  Each machine's local rank 0 uploads what its ranks wrote, rank 0 the tag once all are up; the other
  ranks wait through the store. A failed upload stops the run with one line naming the URL and the
  endpoint; the checkpoint saved before stays complete.
* **Time to save**: each save's seconds (write, and upload to a bucket) are logged; one that took over
  half of ``callbacks.preemption.grace_period_s`` is warned about once, since a checkpoint written after a
  preemption signal would not finish before the forced exit.
* **The checkpoint resumed from is kept**: Lightning never deletes the checkpoint a run resumed from
  (its ``_should_remove_checkpoint`` compares with ``trainer.ckpt_path``), but only on local disk, and a
  run resumed from a bucket gives Lightning the downloaded copy; ``resumed_from`` (set by
  :class:`~trainer.callbacks.resumed_from_bucket.ResumedFromBucket`) names the remote one, which retention
  then never deletes either.
* **Final step**: Lightning saves on every ``every_n_train_steps``; when ``max_steps`` is not a
  multiple of it, the last steps are lost and ``last.ckpt`` is stale (its ``on_train_end`` only
  saves when nothing was saved at all). This subclass saves the final step, as a top-k checkpoint
  and as ``last.ckpt``.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any
from weakref import proxy

import lightning as L

from lf_common import object_store
from lf_common.atomic import replace_path
from lf_common.errors import ConfigError, StorageError
from lf_common.storage import path_size, write_failure
from trainer.callbacks.checkpoint_upload import save_and_upload
from trainer.callbacks.lightning_private import ModelCheckpointHooks, write_checkpoint
from trainer.checkpoint.remote import remove_checkpoint
from trainer.checkpoint.resume import PARTIAL_SUFFIX, checkpoint_problem, checkpoint_step, checkpoints_newest_first
from trainer.faults.ranks import single_rank_work

log = logging.getLogger(__name__)

GRACE_SHARE = 0.5
"""A save that takes more than this share of the preemption grace period is warned about."""


class AtomicModelCheckpoint(ModelCheckpointHooks):
    """``lightning.pytorch.callbacks.ModelCheckpoint`` that writes atomically and keeps every N-th step.

    Args:
        keep_every_n_steps: never delete checkpoints whose step is a multiple of this (``None``: off).
        staging_dir: with a URL ``dirpath``, the local folder each checkpoint is written to before its
            upload (``None``: ``<trainer.default_root_dir>/checkpoint-staging``).
        **kwargs: ``ModelCheckpoint``'s arguments.
    """

    def __init__(
        self, *args: Any, keep_every_n_steps: int | None = None, staging_dir: str | None = None, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        if keep_every_n_steps is not None and keep_every_n_steps < 1:
            raise ConfigError(f"keep_every_n_steps={keep_every_n_steps}: expected a positive number or null")
        self.keep_every_n_steps = keep_every_n_steps
        self.staging_dir = staging_dir
        self._warned_slow = False
        self.resumed_from: str | None = None  # the remote checkpoint the run resumed from: never deleted
        if object_store.is_store(self.dirpath) and self.save_last == "link":
            raise ConfigError(f"save_last=link with dirpath={self.dirpath}: a bucket has no links; set save_last=true")

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit" and self.dirpath:  # a bucket: fail now, not at the first save
            object_store.require_writable(self.dirpath, "an existing bucket for callbacks.model_checkpoint.dirpath")
        super().setup(trainer, pl_module, stage)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self.record_saved(trainer.global_step)  # a resumed step is in the checkpoint it came from

    def save_checkpoint_file(self, trainer: L.Trainer, filepath: str) -> None:
        started = time.monotonic()
        remote = object_store.is_store(filepath)  # no rename there: staged locally, then uploaded
        if remote:
            staging = Path(self.staging_dir or Path(trainer.default_root_dir) / "checkpoint-staging")
            save_and_upload(trainer, filepath, staging / object_store.basename(filepath), self.save_weights_only)
        else:
            self._save_local(trainer, filepath)
        if trainer.is_global_zero:
            self._report_time(
                trainer, filepath, "written and uploaded" if remote else "written", time.monotonic() - started
            )
        self.record_saved(trainer.global_step, filepath)
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.after_save_checkpoint(proxy(self))

    def _report_time(self, trainer: L.Trainer, filepath: str, done: str, seconds: float) -> None:
        """Log how long the save took; warn (once) when a preemption's save would outlast its grace period."""
        log.info("checkpoint %s %s in %.1f s", filepath, done, seconds)
        grace = next((c.grace_period_s for c in trainer.callbacks if getattr(c, "grace_period_s", None)), None)
        if grace is None or seconds <= GRACE_SHARE * grace or self._warned_slow:
            return
        self._warned_slow = True
        log.warning(
            "checkpoint %s was %s in %.1f s, over half of callbacks.preemption.grace_period_s=%g: after a preemption "
            "signal the step in progress and this save may not finish before the forced exit (the checkpoint before "
            "it would be kept); raise grace_period_s (below the scheduler's kill time)%s",
            filepath,
            done,
            seconds,
            grace,
            ", or write checkpoints to local disk" if done != "written" else "",
        )

    def _save_local(self, trainer: L.Trainer, filepath: str) -> None:
        """Write ``filepath`` under a temporary name on every rank, rename it once all have written."""
        partial = filepath + PARTIAL_SUFFIX
        if trainer.is_global_zero and self.filesystem.exists(partial):  # left by a crash
            self.filesystem.rm(partial, recursive=True)
        trainer.strategy.barrier("checkpoint_partial_clear")
        with single_rank_work("checkpoint save", trainer.global_step, worker=None, growing=partial):
            try:
                write_checkpoint(trainer, partial, self.save_weights_only)
            except OSError as error:
                if self.filesystem.exists(partial):  # free what it took; the previous checkpoint stays
                    self.filesystem.rm(partial, recursive=True)
                raise StorageError(self._write_failure(filepath, error)) from error
        trainer.strategy.barrier("checkpoint_written")
        if trainer.is_global_zero:
            replace_path(partial, filepath)
        trainer.strategy.barrier("checkpoint_renamed")

    def _write_failure(self, filepath: str, error: OSError) -> str:
        """The message for a failed write of ``filepath``: the newest complete checkpoint (named by its step
        when one is) is kept, and this one needs about as much space."""
        complete = [p for p in checkpoints_newest_first(Path(filepath).parent) if checkpoint_problem(p) is None]
        previous = next((p for p in complete if checkpoint_step(p) is not None), complete[0] if complete else None)
        needed = path_size(previous) if previous is not None else None
        return write_failure(filepath, error, needed, previous.name if previous is not None else None)

    def remove_checkpoint_file(self, trainer: L.Trainer, filepath: str) -> None:
        step = checkpoint_step(filepath)
        if self.keep_every_n_steps and step is not None and step > 0 and step % self.keep_every_n_steps == 0:
            return
        if object_store.is_store(filepath):
            resumed = self.resumed_from is not None and filepath.rstrip("/") == self.resumed_from.rstrip("/")
            if trainer.is_global_zero and not resumed:
                remove_checkpoint(filepath)
            return
        super().remove_checkpoint_file(trainer, filepath)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.save_top_k_and_last(trainer)
        super().on_train_end(trainer, pl_module)
