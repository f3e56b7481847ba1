"""One checkpoint to a bucket, on every rank: write it to local staging, upload it, remove the local copy.

The steps, each ended by a meeting of all ranks (:func:`trainer.faults.ranks.all_ranks`: through the
store while some ranks work, so a long upload never trips the process-group timeout, and a failure on
one rank stops them all):

1. every rank writes its part (``Trainer.save_checkpoint``'s collection and the strategy's write: one
   file from rank 0, or a DeepSpeed folder with a file per rank) into ``staged``, on local disk;
2. a DeepSpeed folder written again under the same name: rank 0 deletes the remote one, ``latest`` tag
   first (it is incomplete from that moment, never a mix of two saves);
3. each machine's local rank 0 uploads what its ranks wrote there (the tag excepted);
4. rank 0 uploads the tag (the folder is complete), and each machine removes its staged copy.

A failed write or upload removes the staged copy (local disk holds at most one checkpoint) and raises:
:class:`~lf_common.errors.StorageError` for the local write, :class:`~lf_common.object_store.ObjectStoreError`
(the URL, the endpoint, why) for the upload. The checkpoint saved before is complete in the bucket.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import lightning as L

from lf_common import object_store
from lf_common.errors import StorageError
from lf_common.storage import write_failure
from trainer.callbacks.lightning_private import write_checkpoint
from trainer.checkpoint.remote import remove_checkpoint, upload_checkpoint, upload_tag
from trainer.faults.ranks import all_ranks, single_rank_work


def save_and_upload(trainer: L.Trainer, url: str, staged: Path, weights_only: bool) -> None:
    """Write the trainer's checkpoint to ``staged`` and upload it to ``url`` (call on every rank).

    Raises:
        StorageError: the local write failed (a full disk).
        ObjectStoreError: the upload failed; names ``url`` and the endpoint.
    """
    strategy, step = trainer.strategy, trainer.global_step
    if trainer.local_rank == 0 and staged.parent.is_dir():
        for left in staged.parent.glob(f"*{staged.suffix}"):  # left by a crash: one checkpoint at a time
            _remove_local(left)  # only checkpoints: the folder may be a shared one (staging_dir=/tmp)
    strategy.barrier("checkpoint_staging_clear")
    with single_rank_work("checkpoint save", step, worker=None, growing=staged):
        try:
            write_checkpoint(trainer, str(staged), weights_only)
        except OSError as error:
            _remove_local(staged)
            reason = write_failure(staged, error, None, f"the checkpoint saved before in {url.rsplit('/', 1)[0]}")
            raise StorageError(reason) from error
    strategy.barrier("checkpoint_written")
    folder = bool(strategy.broadcast(staged.is_dir()))
    zero, local_zero = trainer.is_global_zero, trainer.local_rank == 0
    try:
        if folder:
            all_ranks(strategy, "checkpoint upload", (lambda: remove_checkpoint(url)) if zero else None)
        all_ranks(strategy, "checkpoint upload", (lambda: upload_checkpoint(staged, url)) if local_zero else None)
        if folder:
            all_ranks(strategy, "checkpoint upload", (lambda: upload_tag(staged, url)) if zero else None)
    except object_store.ObjectStoreError as error:
        raise object_store.ObjectStoreError(
            f"{error}; the checkpoint saved before it stays complete: run the same command again (auto_resume=true "
            "or ckpt_path=last) to resume from it"
        ) from error
    finally:
        if local_zero:
            _remove_local(staged)


def _remove_local(path: Path) -> None:
    """Remove a staged checkpoint (file or folder); gone already is fine."""
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
