"""Turn what a user names (a folder, a glob, a brace pattern, a list) into a list of shard paths."""

from __future__ import annotations

from collections.abc import Sequence

from braceexpand import braceexpand

from lf_common import object_store
from lf_common.errors import DataError

SHARDS_EXPECTED = (
    "give a folder of .tar shards (lf-shards' out_dir), a glob or a brace pattern ('data/shard-{000000..000009}.tar')"
)
"""The fix named when a shard list names no shard."""


def resolve_shards(spec: str | Sequence[str]) -> list[str]:
    """List the shard files ``spec`` names, sorted; local paths and object-store URLs alike.

    Args:
        spec: a folder (its ``*.tar`` files; with or without a trailing ``/``: ``s3://bucket/raw`` is the
            prefix's ``.tar`` objects when objects lie under it), a glob (``data/*.tar``), a brace pattern
            (``data/shard-{000000..000009}.tar``; checked to exist, one listing per folder, not one request a
            shard), a ``pipe:`` command or ``http(s)://`` URL that webdataset opens (passed through unchecked),
            or a list of any of these.

    Raises:
        DataError: a named path or object does not exist, or nothing matches.
    """
    specs = [spec] if isinstance(spec, str) else list(spec)
    paths: list[str] = []
    for item in specs:
        named: list[str] = []  # neither glob nor folder by their name: a shard, or a folder named without its "/"
        for pattern in braceexpand(str(item)):
            if object_store.passed_through(pattern):
                paths.append(pattern)
            elif any(ch in pattern for ch in "*?["):
                found = object_store.glob(pattern)
                if not found:
                    raise DataError(f"{pattern}: no shard matches this pattern; {SHARDS_EXPECTED}")
                paths.extend(found)
            elif pattern.endswith("/"):
                paths.extend(_folder_shards(pattern))
            else:
                named.append(pattern)
                paths.append(pattern)
        expanded = _named_shards(named)
        paths = [shard for path in paths for shard in expanded.get(path, [path])]
    if not paths:
        raise DataError(f"{spec!r}: names no shards")
    return paths


def _folder_shards(folder: str) -> list[str]:
    """The ``.tar`` files of a local folder or directly under a prefix.

    Raises:
        DataError: the folder holds none, or is not there (the store's one line for a prefix).
    """
    try:
        found = object_store.list_files(folder, ".tar")
    except FileNotFoundError as error:
        raise DataError(f"{folder}: shard path does not exist; {SHARDS_EXPECTED}") from error
    if not found:
        raise DataError(f"{folder}: folder holds no .tar shards; {SHARDS_EXPECTED}")
    return found


def _named_shards(named: list[str]) -> dict[str, list[str]]:
    """Check that each path of ``named`` is a shard or a folder of shards (one listing of each parent folder, not one
    request per shard): a folder maps to its shards, a shard to itself.

    Raises:
        DataError: naming the first missing paths and how many are missing.
    """
    listed: dict[str, dict[str, str]] = {}  # parent -> name -> "file" or "directory"
    expanded: dict[str, list[str]] = {}
    missing: list[str] = []
    for path in named:
        parent = object_store.parent(path)
        if parent not in listed:
            try:
                entries = object_store.list_entries(parent, must_exist=True)
            except FileNotFoundError:  # a local folder that is not there: its shards are missing
                entries = []
            listed[parent] = {object_store.basename(e["url"]): e.get("type", "file") for e in entries}
        kind = listed[parent].get(object_store.basename(path))
        if kind == "directory":
            expanded[path] = _folder_shards(path)
        elif kind is None:
            missing.append(path)
    if missing:
        raise DataError(
            f"{missing[0]}: shard path does not exist ({len(missing)} of {len(named)} named are missing); "
            f"{SHARDS_EXPECTED}"
        )
    return expanded
