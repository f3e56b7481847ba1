"""What lies under a local folder or a prefix: entries, files, objects at any depth, glob matches."""

from __future__ import annotations

import glob as local_glob
import os
from typing import Any

from lf_common.object_store.checks import require_bucket
from lf_common.object_store.clients import STORE_ERRORS, filesystem, storage_error
from lf_common.object_store.paths import is_url


def object_infos(url: str, expected: str = "an existing object or prefix") -> dict[str, dict[str, Any]]:
    """The objects at ``url`` (one object, or every object under the prefix, at any depth), by path relative
    to ``url`` (``""`` for a single object): fsspec's details (``size``, ``ETag``, ``LastModified``, ...).

    Raises:
        ObjectStoreError: nothing is at ``url``, or the store cannot be reached; names ``url``, the endpoint
            and what was ``expected``.
    """
    fs, path = filesystem(url)
    path = path.rstrip("/")
    try:
        fs.invalidate_cache(path)
        found = fs.find(path, detail=True)
    except STORE_ERRORS as error:
        raise storage_error(url, error, expected) from error
    if not found:
        require_bucket(url, expected)
        raise storage_error(url, FileNotFoundError(url), expected)
    if list(found) == [path]:
        return {"": found[path]}
    return {name[len(path) + 1 :]: info for name, info in found.items() if name.startswith(path + "/")}


def list_entries(prefix: str | os.PathLike[str], must_exist: bool = False) -> list[dict[str, Any]]:
    """What lies directly under a local folder or a ``prefix``: files or objects (``type: file``) and folders or
    sub-prefixes (``type: directory``), each with ``url`` (its path or URL) and ``modified`` (when it was written,
    seconds since the epoch; 0 for a sub-prefix), and for an object fsspec's details; empty when nothing is there
    (unless ``must_exist``).

    Raises:
        ObjectStoreError: the bucket is missing or the store cannot be reached; with ``must_exist``, also nothing
            under the prefix.
        FileNotFoundError: with ``must_exist``, a local folder that is not there.
    """
    if not is_url(prefix):
        return _local_entries(os.fspath(prefix), must_exist)
    prefix = str(prefix)
    fs, path = filesystem(prefix)
    protocol = prefix.split("://", 1)[0]
    try:
        fs.invalidate_cache(path.rstrip("/"))
        entries = fs.ls(path.rstrip("/"), detail=True)
    except FileNotFoundError as error:
        if must_exist:
            raise storage_error(prefix, error, "an existing bucket and prefix") from error
        return []
    except STORE_ERRORS as error:
        raise storage_error(prefix, error, "a reachable bucket") from error
    return [
        {
            **entry,
            "url": f"{protocol}://{entry['name'].rstrip('/')}",
            "modified": entry["LastModified"].timestamp() if "LastModified" in entry else 0.0,
        }
        for entry in entries
    ]


def _local_entries(folder: str, must_exist: bool) -> list[dict[str, Any]]:
    """:func:`list_entries` of a local folder (empty when it is missing or a file, unless ``must_exist``)."""
    try:
        with os.scandir(folder) as found:
            listed = [(entry.path, entry.is_dir(), entry.stat()) for entry in found]
    except (FileNotFoundError, NotADirectoryError) as error:
        if must_exist:
            raise FileNotFoundError(f"{folder}: no such folder") from error
        return []
    return [
        {"url": path, "type": "directory" if is_dir else "file", "size": stat.st_size, "modified": stat.st_mtime}
        for path, is_dir, stat in sorted(listed)
    ]


def list_objects(prefix: str, suffix: str = "") -> list[str]:
    """URLs of the objects directly under ``prefix`` (a "folder") whose names end with ``suffix``, sorted.

    Raises:
        ObjectStoreError: the bucket is missing or unreachable; names the prefix.
    """
    fs, path = filesystem(prefix)
    protocol = prefix.split("://", 1)[0]
    try:
        fs.invalidate_cache(path)
        entries = fs.ls(path.rstrip("/"), detail=True)
    except FileNotFoundError as error:
        raise storage_error(prefix, error, "an existing bucket and prefix") from error
    except STORE_ERRORS as error:
        raise storage_error(prefix, error, "a reachable bucket") from error
    names = [entry["name"] for entry in entries if entry.get("type") == "file" and entry["name"].endswith(suffix)]
    return sorted(f"{protocol}://{name}" for name in names)


def glob_objects(pattern: str) -> list[str]:
    """URLs of the objects matching a glob (``s3://bucket/data/*.tar``), sorted."""
    fs, path = filesystem(pattern)
    protocol = pattern.split("://", 1)[0]
    try:
        return sorted(f"{protocol}://{name}" for name in fs.glob(path))
    except STORE_ERRORS as error:
        raise storage_error(pattern, error, "an existing bucket") from error


def list_files(folder: str | os.PathLike[str], suffix: str = "") -> list[str]:
    """The files of a local folder, or the objects directly under a prefix (a trailing ``/`` or none), whose names
    end with ``suffix``: paths or URLs, sorted.

    Raises:
        ObjectStoreError: the bucket or the prefix is missing, or the store cannot be reached; names the prefix.
        FileNotFoundError: a local folder that is not there.
    """
    entries = list_entries(folder, must_exist=True)
    return sorted(e["url"] for e in entries if e.get("type") == "file" and e["url"].endswith(suffix))


def glob(pattern: str) -> list[str]:
    """The local paths or the objects matching a glob (``data/*.tar``, ``s3://bucket/data/*.tar``), sorted."""
    return glob_objects(pattern) if is_url(pattern) else sorted(local_glob.glob(pattern))
