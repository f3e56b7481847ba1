"""Writing a local file or an object so that no reader sees it half-written (a rename on local disk, one PUT or a
completed upload in a store), uploading local files and folders, and deleting."""

from __future__ import annotations

import os
import posixpath
from pathlib import Path

from lf_common.atomic import atomic_path
from lf_common.object_store.clients import STORE_ERRORS, filesystem, storage_error
from lf_common.object_store.paths import is_bucket, is_url, join


def write_bytes(url: str, data: bytes) -> None:
    """Put ``data`` at ``url`` in one request: readers see the old object or the new one, never a part."""
    fs, path = filesystem(url)
    try:
        fs.pipe_file(path, data)
    except STORE_ERRORS as error:
        raise storage_error(url, error, "a writable bucket") from error


def write_path(path: str | os.PathLike[str], data: bytes) -> None:
    """Write a local file (to a temporary name, then renamed) or an object (one PUT): never seen half-written."""
    if is_url(path):
        write_bytes(str(path), data)
        return
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def upload(local: str | os.PathLike[str], url: str) -> None:
    """Upload a complete local file to ``url`` (visible under its key only once the whole upload completed)."""
    fs, path = filesystem(url)
    try:
        fs.put_file(os.fspath(local), path)
    except STORE_ERRORS as error:
        raise storage_error(url, error, "a writable bucket") from error


def upload_folder(local: str | os.PathLike[str], url: str, last: tuple[str, ...] = ()) -> list[str]:
    """Upload every file under the local folder ``local`` to the prefix ``url``, the files named in ``last``
    (paths relative to ``local``) after all others, in that order; the URLs uploaded.

    A reader that takes the prefix as complete only once a ``last`` file is there (a DeepSpeed
    checkpoint's ``latest``, a pipeline's ``model_index.json``) never sees a partial upload as whole.
    """
    root = os.fspath(local)
    files = sorted(os.path.relpath(os.path.join(d, f), root) for d, _, names in os.walk(root) for f in names)
    names = [f for f in files if f not in last] + [f for f in last if f in files]
    urls = [join(url, *name.split(os.sep)) for name in names]
    for name, target in zip(names, urls, strict=True):
        upload(os.path.join(root, name), target)
    return urls


def remove(url: str, first: tuple[str, ...] = ()) -> None:
    """Delete the object at ``url``, or every object under the prefix ``url`` (a "folder"): the ones named in
    ``first`` (relative to ``url``) before the rest, so a folder stops being complete before it disappears.
    Nothing there is fine.

    Raises:
        ObjectStoreError: ``url`` is a whole bucket (its objects and the bucket itself would go).
    """
    if is_bucket(url):
        raise storage_error(url, ValueError("a whole bucket is never deleted"), "a prefix in the bucket (s3://b/NAME)")
    fs, path = filesystem(url)
    try:
        for name in first:
            if fs.exists(posixpath.join(path, name)):
                fs.rm_file(posixpath.join(path, name))
        if fs.exists(path):
            fs.rm(path, recursive=True)
    except FileNotFoundError:
        return
    except STORE_ERRORS as error:
        raise storage_error(url, error, "a writable bucket") from error


def make_folder(path: str | os.PathLike[str]) -> None:
    """Create a local folder (and its parents) when missing; a prefix needs nothing (it exists once objects do)."""
    if not is_url(path):
        Path(path).mkdir(parents=True, exist_ok=True)
