"""Checkpoints written to a store (``callbacks.model_checkpoint.dirpath=s3://...``): upload and delete.

A store has no rename, so a checkpoint is written to local disk first (a staging folder) and then
uploaded; what a reader takes as complete is fixed by the upload order:

* a checkpoint file (``step-0000500.ckpt``, ``last.ckpt``) is one object: S3 shows it only once its
  upload (one PUT, or a multipart upload) completed, and an overwritten ``last.ckpt`` stays the old
  object until the new one is whole;
* a DeepSpeed checkpoint folder is many objects, its ``latest`` tag uploaded last; a folder without
  ``latest`` is incomplete (:func:`trainer.checkpoint.resume.checkpoint_problem`), so an upload cut
  short is never resumed from. A folder written again under the same name (``last.ckpt/``) first
  loses its ``latest``, then its other objects, before the new ones are uploaded.

Finding and resuming from them is the same code as for a local folder (:mod:`trainer.checkpoint.resume`:
``last`` against steps by upload time; the chosen one downloaded into a local cache and checked there).
"""

from __future__ import annotations

from pathlib import Path

from lf_common import object_store
from trainer.checkpoint.resume import TAG_FILE

__all__ = ["TAG_FILE", "remove_checkpoint", "upload_checkpoint", "upload_tag"]


def upload_checkpoint(local: Path, url: str, skip: tuple[str, ...] = (TAG_FILE,)) -> None:
    """Upload a staged checkpoint: a file in one object, or the files of a DeepSpeed folder but ``skip``.

    Args:
        local: the checkpoint file or folder on local disk.
        url: where it goes (``s3://bucket/run/checkpoints/step-0000500.ckpt``).
        skip: files of a folder left for :func:`upload_tag` (after every rank's files are up).
    """
    if local.is_dir():
        for name in sorted(p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file()):
            if name not in skip:
                object_store.upload(local / name, object_store.join(url, name))
    elif local.is_file():
        object_store.upload(local, url)


def upload_tag(local: Path, url: str) -> None:
    """Upload the ``latest`` tag of a staged DeepSpeed folder: the remote folder becomes complete."""
    if (local / TAG_FILE).is_file():
        object_store.upload(local / TAG_FILE, object_store.join(url, TAG_FILE))


def remove_checkpoint(url: str) -> None:
    """Delete a remote checkpoint; a folder loses its ``latest`` tag first (incomplete before it is gone)."""
    object_store.remove(url, first=(TAG_FILE,))
