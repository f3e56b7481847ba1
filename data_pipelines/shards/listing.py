"""Turn what a user names (a folder, a glob, a brace pattern, a list) into a list of shard paths."""

from __future__ import annotations

import glob
from collections.abc import Sequence
from pathlib import Path

from braceexpand import braceexpand

from lf_common import object_store
from lf_common.errors import DataError

SHARDS_EXPECTED = (
    "give a folder of .tar shards (lf-shards' out_dir), a glob or a brace pattern ('data/shard-{000000..000009}.tar')"
)
"""The fix named when a shard list names no shard."""


def resolve_shards(spec: str | Sequence[str]) -> list[str]:
    """List the shard files ``spec`` names, sorted.

    Args:
        spec: a folder (its ``*.tar`` files), a glob (``data/*.tar``), a brace pattern
            (``data/shard-{000000..000009}.tar``), an object-store URL of any of these
            (``s3://bucket/prefix/`` lists the prefix's ``.tar`` objects; ``s3://bucket/shard-{000000..000099}.tar``;
            checked to exist, one listing per prefix), a ``pipe:`` command or ``http(s)://`` URL that
            webdataset opens (passed through unchecked), or a list of any of these.

    Raises:
        DataError: a named path or object does not exist, or nothing matches.
    """
    specs = [spec] if isinstance(spec, str) else list(spec)
    paths: list[str] = []
    for item in specs:
        named: list[str] = []
        for pattern in braceexpand(str(item)):
            if object_store.is_url(pattern):
                paths.extend(_remote_shards(pattern, named))
                continue
            if pattern.startswith("pipe:") or "://" in pattern:
                paths.append(pattern)
                continue
            path = Path(pattern)
            if path.is_dir():
                found = sorted(str(p) for p in path.glob("*.tar"))
                if not found:
                    raise DataError(f"{path}: folder holds no .tar shards; {SHARDS_EXPECTED}")
            elif any(ch in pattern for ch in "*?["):
                found = sorted(glob.glob(pattern))
                if not found:
                    raise DataError(f"{pattern}: no shard matches this pattern; {SHARDS_EXPECTED}")
            elif path.is_file():
                found = [str(path)]
            else:
                raise DataError(f"{path}: shard path does not exist; {SHARDS_EXPECTED}")
            paths.extend(found)
        _check_objects_exist(named)
    if not paths:
        raise DataError(f"{spec!r}: names no shards")
    return paths


def _remote_shards(pattern: str, named: list[str]) -> list[str]:
    """The shard URLs ``pattern`` names: a prefix's ``.tar`` objects, a glob's matches, or the URL itself
    (appended to ``named``, to be checked by :func:`_check_objects_exist`)."""
    if pattern.endswith("/"):
        found = object_store.list_objects(pattern, ".tar")
        if not found:
            raise DataError(f"{pattern}: prefix holds no .tar objects; {SHARDS_EXPECTED}")
        return found
    if any(ch in pattern for ch in "*?["):
        found = object_store.glob_objects(pattern)
        if not found:
            raise DataError(f"{pattern}: no object matches this pattern; {SHARDS_EXPECTED}")
        return found
    named.append(pattern)
    return [pattern]


def _check_objects_exist(urls: list[str]) -> None:
    """Every URL names an existing object (one listing of each prefix, not one request per shard).

    Raises:
        DataError: naming the first missing objects and how many are missing.
    """
    prefixes: dict[str, set[str]] = {}
    for url in urls:
        prefix = url.rsplit("/", 1)[0] + "/"
        if prefix not in prefixes:
            prefixes[prefix] = set(object_store.list_objects(prefix))
    missing = [url for url in urls if url not in prefixes[url.rsplit("/", 1)[0] + "/"]]
    if missing:
        raise DataError(f"{missing[0]}: shard object does not exist ({len(missing)} of {len(urls)} named are missing)")
