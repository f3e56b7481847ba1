"""Sizes on disk, and the message for a write that the storage refused (a full disk, a failing device)."""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path


def path_size(path: str | Path) -> int:
    """Bytes in a file, or in all files under a folder (0 when missing or removed while measured)."""
    path = Path(path)
    try:
        if path.is_file():
            return path.stat().st_size
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    except OSError:
        return 0


def human_bytes(size: float) -> str:
    """``1.5 GB``-style size (powers of 1000)."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(size) < 1000 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} TB"


def free_bytes(folder: str | Path) -> int | None:
    """Free bytes on the file system of ``folder`` (its nearest existing parent); ``None`` when unknown."""
    folder = Path(folder)
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def write_failure(target: str | Path, error: OSError, needed: int | None, keep: str | None) -> str:
    """What a failed write of ``target`` means for the user: which path, why, the space needed and free, what is kept.

    Args:
        target: what was being written (its final name).
        error: the ``OSError`` the write raised.
        needed: bytes the write needs (e.g. the previous checkpoint's size), when known.
        keep: what is still complete and used instead (e.g. ``"step-0000400.ckpt"``), when anything.
    """
    target = Path(target)
    reason = os.strerror(error.errno) if error.errno else str(error)
    parts = [f"writing {target} failed: {reason}"]
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        free = free_bytes(target.parent)
        space = f"about {human_bytes(needed)} needed" if needed else "more space needed"
        parts.append(f"{space}, {human_bytes(free) if free is not None else 'unknown'} free on {target.parent}")
    parts.append(f"{keep} is complete and stays the newest" if keep else "no earlier complete one exists")
    fix = "free space or write elsewhere" if error.errno in (errno.ENOSPC, errno.EDQUOT) else "check the storage"
    return "; ".join(parts) + f"; {fix}, then run the same command again to resume"
