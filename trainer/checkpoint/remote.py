"""Checkpoints in a store (``callbacks.model_checkpoint.dirpath=s3://...``): upload, delete, find, download.

A store has no rename, so a checkpoint is written to local disk first (a staging folder) and then
uploaded; what a reader takes as complete is fixed by the upload order:

* a checkpoint file (``step-0000500.ckpt``, ``last.ckpt``) is one object: S3 shows it only once its
  upload (one PUT, or a multipart upload) completed, and an overwritten ``last.ckpt`` stays the old
  object until the new one is whole;
* a DeepSpeed checkpoint folder is many objects, its ``latest`` tag uploaded last; a folder without
  ``latest`` is incomplete (:func:`trainer.checkpoint.resume.checkpoint_problem`), so an upload cut
  short is never resumed from. A folder written again under the same name (``last.ckpt/``) first
  loses its ``latest``, then its other objects, before the new ones are uploaded.

A resume (:func:`choose_remote_checkpoint`) orders the remote checkpoints as local ones
(:func:`trainer.checkpoint.resume.newest_first`: ``last`` against steps by upload time), downloads the
newest into a local cache, checks it as a local one, and passes over a damaged one with a log line.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from lf_common import object_store
from lf_common.errors import DataError
from lf_common.object_cache import cached_copy
from trainer.checkpoint.resume import (
    LAST_NAME,
    PARTIAL_SUFFIX,
    checkpoint_problem,
    first_complete,
    newest_first,
    older_than,
)

log = logging.getLogger(__name__)

CHECKPOINT_CACHE = "checkpoint-cache"
"""The folder under ``output_dir`` that a remote checkpoint is downloaded to before a resume."""
TAG_FILE = "latest"
"""The file of a DeepSpeed checkpoint folder that names its tag; uploaded last."""


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


def remote_checkpoints(folder: str) -> dict[str, float]:
    """The checkpoints under the prefix ``folder``: URL -> upload time (a folder's: its ``latest`` tag's, or
    0 when it has none: incomplete, tried last among equals)."""
    return {url: 0.0 if written is None else written for url, written in _listed_checkpoints(folder).items()}


def _listed_checkpoints(folder: str) -> dict[str, float | None]:
    """:func:`remote_checkpoints`, with ``None`` for a folder without its ``latest`` tag."""
    written: dict[str, float | None] = {}
    for entry in object_store.list_entries(folder):
        url = entry["url"]
        if not url.endswith(".ckpt") or url.endswith(PARTIAL_SUFFIX):
            continue
        if entry.get("type") == "directory":
            infos = object_store.list_entries(object_store.join(url, ""))
            tag = next((i for i in infos if object_store.basename(i["url"]) == TAG_FILE), None)
            written[url] = (tag["LastModified"].timestamp() if "LastModified" in tag else 0.0) if tag else None
        else:
            written[url] = entry["LastModified"].timestamp() if "LastModified" in entry else 0.0
    return written


def has_remote_checkpoints(folder: str) -> bool:
    """Whether the prefix ``folder`` holds checkpoints (complete or damaged). A folder without its ``latest`` tag
    (an upload cut short, or a deletion) does not count, as a local ``.partial`` does not: a run whose first
    checkpoint's upload was cut short starts afresh under ``auto_resume``."""
    listed = _listed_checkpoints(folder)
    return bool(newest_first({url: written for url, written in listed.items() if written is not None}))


def _is_checkpoint_folder(url: str) -> bool:
    """A prefix holding checkpoints (not itself a DeepSpeed checkpoint folder, nor a checkpoint file: a listing
    of a file's key gives the file itself)."""
    entries = object_store.list_entries(object_store.join(url, ""))
    names = {object_store.basename(e["url"]) for e in entries if e["url"] != url.rstrip("/")}
    return TAG_FILE not in names and any(name.endswith(".ckpt") for name in names)


def resolve_remote_checkpoint(ckpt_path: str, checkpoint_dir: str | None, cache_dir: Path) -> str:
    """The local copy of the complete remote checkpoint to resume from: :func:`choose_remote_checkpoint`'s."""
    return choose_remote_checkpoint(ckpt_path, checkpoint_dir, cache_dir)[1]


def choose_remote_checkpoint(ckpt_path: str, checkpoint_dir: str | None, cache_dir: Path) -> tuple[str, str]:
    """The complete remote checkpoint to resume from (the rules of
    :func:`trainer.checkpoint.resume.resolve_resume_checkpoint`): its URL and its local copy.

    Args:
        ckpt_path: ``"last"`` (the newest complete checkpoint under ``checkpoint_dir``), a prefix of
            checkpoints, or a checkpoint URL (itself, or when damaged the newest complete one before it).
        checkpoint_dir: the run's checkpoint prefix (for ``"last"``).
        cache_dir: where the copy is downloaded (other copies there are removed: one checkpoint on disk).

    Raises:
        DataError: no complete checkpoint is found (each one tried and why it was refused).
        ObjectStoreError: the store cannot be reached.
    """
    if ckpt_path == LAST_NAME:
        folder = str(checkpoint_dir)
        candidates, where = newest_first(remote_checkpoints(folder)), folder
    elif _is_checkpoint_folder(ckpt_path):
        candidates, where = newest_first(remote_checkpoints(ckpt_path)), ckpt_path
    else:
        if not object_store.exists(ckpt_path):
            raise DataError(
                f"ckpt_path={ckpt_path}: checkpoint does not exist; give a checkpoint or a folder of them, or "
                "ckpt_path=last (the newest complete one in callbacks.model_checkpoint.dirpath)"
            )
        parent = ckpt_path.rstrip("/").rsplit("/", 1)[0]
        candidates = [ckpt_path, *older_than(ckpt_path, newest_first(remote_checkpoints(parent)))]
        where = ckpt_path
    copies: dict[str, Path] = {}

    def problem(url: str) -> str | None:
        try:
            copies[url] = cached_copy(url, cache_dir)
        except object_store.ObjectStoreError as error:
            return f"cannot be downloaded: {error}"
        reason = checkpoint_problem(copies[url])
        if reason is not None:
            shutil.rmtree(copies[url].parent, ignore_errors=True)  # no damaged copy kept on disk
        return reason

    chosen = first_complete(candidates, problem, ckpt_path, where)
    _keep_only(cache_dir, copies[chosen])
    return chosen, str(copies[chosen])


def _keep_only(cache_dir: Path, copy: Path) -> None:
    """Remove every cached checkpoint but ``copy`` (local disk holds one downloaded checkpoint)."""
    keep = copy.parent.parent  # <cache_dir>/<url key>/<version>/<name>
    for entry in cache_dir.iterdir():
        if entry != keep and entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
