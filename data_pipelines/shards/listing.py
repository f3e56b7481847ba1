"""Turn what a user names (a folder, a glob, a brace pattern, a list) into a list of shard paths."""

from __future__ import annotations

import glob
from collections.abc import Sequence
from pathlib import Path

from braceexpand import braceexpand

from lf_common.errors import DataError

SHARDS_EXPECTED = (
    "give a folder of .tar shards (lf-shards' out_dir), a glob or a brace pattern ('data/shard-{000000..000009}.tar')"
)
"""The fix named when a shard list names no shard."""


def resolve_shards(spec: str | Sequence[str]) -> list[str]:
    """List the shard files ``spec`` names, sorted.

    Args:
        spec: a folder (its ``*.tar`` files), a glob (``data/*.tar``), a brace pattern
            (``data/shard-{000000..000009}.tar``), a URL or ``pipe:`` command that webdataset
            opens (``pipe:aws s3 cp s3://bucket/shard-{000000..000099}.tar -``, ``https://...``;
            passed through unchecked), or a list of any of these.

    Raises:
        DataError: a named path does not exist, or nothing matches.
    """
    specs = [spec] if isinstance(spec, str) else list(spec)
    paths: list[str] = []
    for item in specs:
        for pattern in braceexpand(str(item)):
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
    if not paths:
        raise DataError(f"{spec!r}: names no shards")
    return paths
