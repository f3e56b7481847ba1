"""Paths and URLs as text: whether a path names an object in a store, joins, parents and how a path is shown.

No request is made here: these answer from the text of the path (and, for :func:`names_folder` and
:func:`names_file`, the local file system).
"""

from __future__ import annotations

import os
import posixpath
from pathlib import Path

_PASSED_TO_WEBDATASET = ("pipe:", "http://", "https://")


def is_url(path: object) -> bool:
    """Whether ``path`` names an object in a store fsspec opens (``s3://``, ``gs://``, ``memory://``, ...)."""
    text = str(path)
    return "://" in text and not text.startswith(_PASSED_TO_WEBDATASET) and not text.startswith("file://")


def passed_through(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is left to webdataset to open as it is (a ``pipe:`` command, an ``http(s)://`` or
    ``file://`` URL): neither a local path nor an object this module reads."""
    text = str(path)
    return text.startswith("pipe:") or ("://" in text and not is_url(text))


def is_store(path: str | os.PathLike[str] | None) -> bool:
    """Whether ``path`` is in a store (no rename: a writer stages locally, then uploads; a reader streams it).

    Only writers that make a write atomic in two ways (a rename on local disk, an upload to a store) and the
    stream openers ask; everything else goes through the path-agnostic functions here, which answer it once.
    """
    return path is not None and is_url(path)


def join(base: str, *names: str) -> str:
    """``base/name/...`` for a URL or a local path."""
    if is_url(base):
        return posixpath.join(base, *names)
    return os.path.join(base, *names)


def basename(path: str) -> str:
    """The last part of a URL or path (``s3://b/p/shard-000001.tar`` -> ``shard-000001.tar``)."""
    return posixpath.basename(str(path).rstrip("/"))


def parent(path: str | os.PathLike[str]) -> str:
    """The folder or prefix holding ``path`` (``s3://b/run/last.ckpt`` -> ``s3://b/run``; ``last.ckpt`` -> ``.``)."""
    text = os.fspath(path).rstrip("/")
    if is_url(text):
        return text.rsplit("/", 1)[0]
    return os.path.dirname(text) or "."


def canonical(path: str | os.PathLike[str]) -> str:
    """How ``path`` is recorded and shown: a URL without its trailing ``/``, a local path made absolute."""
    return os.fspath(path).rstrip("/") if is_url(path) else str(Path(path).resolve())


def display(path: str | os.PathLike[str]) -> str:
    """``path`` as shown to the user: a URL without its trailing ``/``, a local path as ``Path`` writes it."""
    return os.fspath(path).rstrip("/") if is_url(path) else str(Path(path))


def as_path(path: str | os.PathLike[str]) -> Path | str:
    """A local path as a ``Path``; a URL as the string it is (a ``Path`` would fold its ``//``)."""
    return os.fspath(path) if is_url(path) else Path(path)


def is_bucket(url: str) -> bool:
    """Whether ``url`` names a whole bucket (``s3://bucket``, ``s3://bucket/``), no key or prefix in it."""
    return is_url(url) and "/" not in url.split("://", 1)[1].strip("/")


def names_folder(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` can name a folder without a request: a local folder that is there, or any prefix URL (whose
    objects are checked, with the store's one-line error, when it is read)."""
    return is_url(path) or os.path.isdir(path)


def names_file(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` can name a file without a request: a local file that is there, or an object URL (checked,
    with the store's one-line error, when it is read)."""
    return is_url(path) or os.path.isfile(path)
