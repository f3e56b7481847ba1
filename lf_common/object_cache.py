"""Local copies of objects in a store (a model folder, an exported model, a LoRA file, a checkpoint, a folder
of images), downloaded once. :func:`model_folder` is the one way a folder given by URL reaches ``from_pretrained``.

What the libraries that load them need is a local path (diffusers' ``from_pretrained``, ``torch.load``,
safetensors), so a URL is copied to a cache folder first. A copy is keyed by the URL and by the
``ETag`` and size of every object under it: an unchanged object is never downloaded again, a changed
one (a newer upload under the same key) is, and the older copy of that URL is then removed, so the
cache holds one version of each URL. A copy is downloaded under a temporary name and renamed when
complete, so an interrupted download is never taken as a copy.

Layout: ``<cache_dir>/<sha256(url)[:16]>/<sha256(url, etags, sizes)[:16]>/<basename of url>``.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

from lf_common import object_store
from lf_common.atomic import atomic_path

CACHE_DIR_VARIABLE = "LF_CACHE_DIR"
"""The environment variable naming the cache folder (default ``~/.cache/latentforge/objects``)."""


def default_cache_dir() -> Path:
    """``$LF_CACHE_DIR``, else ``~/.cache/latentforge/objects``."""
    return Path(os.environ.get(CACHE_DIR_VARIABLE) or Path.home() / ".cache" / "latentforge" / "objects")


def _version(url: str, infos: dict[str, dict[str, Any]]) -> str:
    """The key of the current contents of ``url``: each object's relative path, ETag and size."""
    listed = sorted((name, str(info.get("ETag", "")), int(info.get("size", 0))) for name, info in infos.items())
    return hashlib.sha256(json.dumps([url, listed]).encode()).hexdigest()[:16]


def cached_copy(
    url: str, cache_dir: str | os.PathLike[str] | None = None, expected: str = "an existing object or prefix"
) -> Path:
    """A local copy of the object, or of every object under the prefix, at ``url``; downloaded only when
    the cache has no copy of these contents.

    Args:
        url: an object (``s3://bucket/model.safetensors``) or a prefix holding objects (an export folder).
        cache_dir: the cache folder (``None``: :func:`default_cache_dir`).
        expected: what ``url`` should hold, for the error when nothing is there.

    Returns:
        The copy: a file for an object, a folder (same relative layout) for a prefix.

    Raises:
        ObjectStoreError: nothing is at ``url``, or the store cannot be reached; names the URL, the endpoint
            and what was ``expected``.
    """
    infos = object_store.object_infos(url, expected)
    home = Path(cache_dir or default_cache_dir()) / hashlib.sha256(url.encode()).hexdigest()[:16]
    version = _version(url, infos)
    copy = home / version / (object_store.basename(url) or "object")
    home.mkdir(parents=True, exist_ok=True)
    with open(home / ".lock", "w") as lock:  # the ranks of one machine: one downloads, the others wait
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not copy.exists():
            _download(url, infos, copy)
        for older in home.iterdir():  # one version of each URL
            if older.is_dir() and older.name != version:
                shutil.rmtree(older, ignore_errors=True)
    return copy


def _download(url: str, infos: dict[str, dict[str, Any]], copy: Path) -> None:
    """Download ``url`` (the objects ``infos`` lists) to ``copy``, under a temporary name until complete."""
    with atomic_path(copy) as tmp:
        if list(infos) == [""]:
            object_store.download(url, tmp)
            return
        for name in infos:
            target = tmp.joinpath(*name.split("/"))
            target.parent.mkdir(parents=True, exist_ok=True)
            object_store.download(object_store.join(url, name), target)


def local_path(
    path: str | os.PathLike[str],
    cache_dir: str | os.PathLike[str] | None = None,
    expected: str = "an existing object or prefix",
) -> str:
    """``path`` itself (unchanged) when local; the cached copy (:func:`cached_copy`) of a URL (an object, or every
    object under a prefix, named with or without its trailing ``/``).

    Raises:
        ObjectStoreError: nothing is at the URL; names it, the endpoint and what was ``expected``.
    """
    if not object_store.is_store(path):
        return str(path)
    return str(cached_copy(str(path).rstrip("/"), cache_dir, expected))


def local_copy(
    path: str | os.PathLike[str],
    cache_dir: str | os.PathLike[str] | None = None,
    expected: str = "an existing object or prefix",
) -> Path:
    """:func:`local_path` as a ``Path``: a local file or folder itself, or the cached copy of a URL."""
    return Path(local_path(path, cache_dir, expected))


MODEL_FOLDER = "a model folder (diffusers/transformers layout: config.json and weights) under this prefix"


def model_folder(path: str | os.PathLike[str], cache_dir: str | os.PathLike[str] | None = None) -> str:
    """A local folder to give ``from_pretrained``: ``path`` itself when local; for a URL (``s3://bucket/sd15/vae``)
    its cached copy, the whole folder downloaded once (atomically, one process per machine; again only when an
    object under it changed). The copy holds the same files, so a fingerprint of it is that of the original.

    Raises:
        ObjectStoreError: nothing is under the URL or its bucket is missing; names the URL, the endpoint and
            that a model folder was expected.
    """
    return local_path(path, cache_dir, MODEL_FOLDER)
