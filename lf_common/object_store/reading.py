"""Reading a local file or an object: streamed (ranged reads), whole, or copied to a local file."""

from __future__ import annotations

import os
from typing import IO

from lf_common.object_store.clients import STORE_ERRORS, filesystem, storage_error
from lf_common.object_store.paths import is_url

_BLOCK_SIZE = 8 << 20  # bytes per ranged read of a streamed object


def open_url(url: str, mode: str = "rb") -> IO[bytes]:
    """Open an object for streamed reading (ranged reads of a few MB) or writing.

    Raises:
        ObjectStoreError: the bucket or key is missing, or the store refused or could not be reached.
    """
    fs, path = filesystem(url)
    try:
        return fs.open(path, mode, block_size=_BLOCK_SIZE)
    except STORE_ERRORS as error:
        raise storage_error(url, error, "an existing object" if "r" in mode else "a writable bucket") from error


def open_path(path: str | os.PathLike[str]) -> IO[bytes]:
    """Open a local file or an object for reading (an object streamed in ranged reads).

    Raises:
        ObjectStoreError: the bucket or key is missing, or the store refused or could not be reached.
        OSError: a local file cannot be opened.
    """
    return open_url(str(path)) if is_url(path) else open(path, "rb")


def read_bytes(url: str) -> bytes:
    """The whole object (small files: manifests, records)."""
    fs, path = filesystem(url)
    try:
        return fs.cat_file(path)
    except STORE_ERRORS as error:
        raise storage_error(url, error, "an existing object") from error


def read_path(path: str | os.PathLike[str]) -> bytes:
    """The bytes of a local file or an object."""
    if is_url(path):
        return read_bytes(str(path))
    with open(path, "rb") as handle:
        return handle.read()


def download(url: str, local: str | os.PathLike[str]) -> None:
    """Copy the object at ``url`` to the local file ``local`` (overwritten; the caller makes it atomic)."""
    fs, path = filesystem(url)
    try:
        fs.get_file(path, os.fspath(local))
    except STORE_ERRORS as error:
        raise storage_error(url, error, "an existing object") from error
