"""Whether something is at a path or URL, and whether a store's bucket answers before work that writes there."""

from __future__ import annotations

import os

from lf_common.object_store.clients import STORE_ERRORS, filesystem, storage_error
from lf_common.object_store.paths import is_url


def exists(url: str | os.PathLike[str]) -> bool:
    """Whether a local file or folder, an object, or a prefix holding objects is at ``url``."""
    if not is_url(url):
        return os.path.exists(url)
    fs, path = filesystem(str(url))
    try:
        return fs.exists(path)
    except STORE_ERRORS as error:
        raise storage_error(url, error, "a reachable bucket") from error


def is_file(path: str | os.PathLike[str]) -> bool:
    """Whether a local file or an object exists at ``path``."""
    return exists(str(path)) if is_url(path) else os.path.isfile(path)


def is_folder(path: str | os.PathLike[str]) -> bool:
    """Whether a local folder, or a prefix holding objects, is at ``path``."""
    return exists(str(path)) if is_url(path) else os.path.isdir(path)


def require_bucket(url: str, expected: str) -> None:
    """Check that the bucket of ``url`` exists and answers (one request), before work that will write there.

    Raises:
        ObjectStoreError: the bucket does not exist, the credentials are refused, or the store cannot be
            reached; names ``url``, the endpoint and what was ``expected``.
    """
    fs, path = filesystem(url)
    bucket = path.split("/", 1)[0]
    try:
        found = fs.exists(bucket)
    except STORE_ERRORS as error:
        raise storage_error(url, error, expected) from error
    if not found:
        raise storage_error(url, FileNotFoundError(f"bucket {bucket} not found"), expected)


def require_writable(path: str | os.PathLike[str], expected: str) -> None:
    """Before work that will write to ``path``: a URL's bucket must exist and answer (one request); a local
    path needs nothing (its folders are made when written).

    Raises:
        ObjectStoreError: see :func:`require_bucket`.
    """
    if is_url(path):
        require_bucket(str(path), expected)
