"""Write-then-rename helpers: a crash never leaves a half-written file under its final name.

Each writer gets its own temporary name next to the target (``<name>.<host>-<pid>-<random>.tmp``),
so several processes or threads writing the same target do not write into each other's
temporary: the last rename wins, and the target is always one complete version. A temporary
left by a writer that died (same host, process gone) is removed by the next writer of the target.
"""

from __future__ import annotations

import errno
import glob
import json
import os
import secrets
import shutil
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

TMP_SUFFIX = ".tmp"
_ASIDE_SUFFIX = ".old"
_REPLACE_TRIES = 100


def _host() -> str:
    """This machine's name as a temporary name holds it: no dots or dashes, at most 24 characters."""
    return socket.gethostname().replace(".", "_").replace("-", "_")[:24] or "host"


def unique_temporary(final: str | Path, suffix: str = TMP_SUFFIX) -> Path:
    """A path next to ``final`` that no other writer uses: ``<name>.<host>-<pid>-<random><suffix>``."""
    final = Path(final)
    return final.with_name(f"{final.name}.{_host()}-{os.getpid()}-{secrets.token_hex(4)}{suffix}")


def _writer_alive(name: str, final: Path) -> bool:
    """Whether the writer that named temporary ``name`` (for ``final``) may still be running."""
    host, _, rest = name[len(final.name) + 1 :].partition("-")
    pid = rest.split("-", 1)[0]
    if host != _host() or not pid.isdigit():
        return True  # another machine's (or an unknown) writer: leave it alone
    try:
        os.kill(int(pid), 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        pass
    return True


def remove_stale_temporaries(final: str | Path) -> None:
    """Remove what writers of ``final`` that no longer run (on this host) left: temporaries, old folders."""
    final = Path(final)
    if not final.parent.is_dir():
        return
    for suffix in (TMP_SUFFIX, _ASIDE_SUFFIX):
        for path in final.parent.glob(f"{glob.escape(final.name)}.*{suffix}"):
            if not _writer_alive(path.name, final):
                _remove(path)


@contextmanager
def atomic_path(final: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``final``, unique to this writer; rename it to ``final`` when the block succeeds.

    Works for files and folders (the block creates what it needs at the yielded path). On an
    exception the temporary is removed and ``final`` is untouched. Concurrent writers of the same
    ``final`` all succeed; ``final`` ends as the complete version of one of them.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(final)
    tmp = unique_temporary(final)
    try:
        yield tmp
    except BaseException:
        _remove(tmp)
        raise
    try:
        replace_path(tmp, final)
    except BaseException:
        _remove(tmp)
        raise


def replace_path(source: str | Path, target: str | Path) -> None:
    """Rename ``source`` (a file or folder) to ``target``, replacing what is there.

    A file is flushed to disk, then replaces ``target`` atomically (``os.replace``). A folder
    cannot replace a non-empty folder in one step: the old one is renamed aside (under a unique
    name) first, then removed, so ``target`` is never a mix of both, also when several writers
    replace it at once.

    Raises:
        OSError: the rename fails (e.g. a folder onto a file), or other writers kept replacing
            ``target`` through every try.
    """
    source, target = Path(source), Path(target)
    if source.is_file():
        with open(source, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(source, target)
        return
    remove_stale_temporaries(target)
    asides: list[Path] = []
    try:
        for _ in range(_REPLACE_TRIES):
            try:
                os.replace(source, target)  # also onto a missing or empty folder
                return
            except OSError as error:
                if error.errno not in (errno.ENOTEMPTY, errno.EEXIST) or not target.is_dir():
                    raise
            aside = unique_temporary(target, _ASIDE_SUFFIX)
            try:
                os.replace(target, aside)
                asides.append(aside)
            except FileNotFoundError:
                pass  # another writer moved it aside first
        raise OSError(errno.EBUSY, f"{target}: still replaced by other writers after {_REPLACE_TRIES} tries")
    finally:
        for aside in asides:
            shutil.rmtree(aside, ignore_errors=True)


def write_json_atomic(path: str | Path, data: Any) -> None:
    """Write ``data`` as indented JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _remove(path: Path) -> None:
    """Remove a file or folder; gone already (another writer's clean-up) is fine."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
