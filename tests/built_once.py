"""Session fixtures built once per test run, also when pytest-xdist runs the tests in several workers.

``make test`` runs the suite in two pytest-xdist worker processes; each worker has its own session,
so a plain session fixture would build its data (shards, latents, the shrunk demo) once per worker.
:func:`built_once` builds it once, in a folder all workers share, behind a file lock.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from filelock import FileLock


def built_once(tmp_path_factory: pytest.TempPathFactory, name: str, build: Callable[[Path], object]) -> Path:
    """The folder ``name``, filled by ``build(folder)`` once per test run.

    Without xdist this is ``tmp_path_factory.mktemp(name)``. Under xdist the folder lies next to the
    workers' own base folders (``pytest-N/<name>``); the first worker to ask builds it while the
    others wait on the lock, and a build that failed (no ``<name>.built`` marker) is built again.
    """
    if "PYTEST_XDIST_WORKER" not in os.environ:
        out = tmp_path_factory.mktemp(name)
        build(out)
        return out
    root = tmp_path_factory.getbasetemp().parent
    out, built = root / name, root / f"{name}.built"
    with FileLock(root / f"{name}.lock"):
        if not built.exists():
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir()
            build(out)
            built.touch()
    return out
