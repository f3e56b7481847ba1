"""Write-then-rename: concurrent writers of one target, failures, and what dead writers left."""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from lf_common.atomic import atomic_path, remove_stale_temporaries, unique_temporary, write_json_atomic

WRITERS = 2
PAYLOAD_BYTES = 1 << 20


def write_version(target: str, version: int, start: threading.Barrier | None = None) -> None:
    """Write ``target`` as 1 MiB of one byte value, in pieces (so the writes interleave)."""
    with atomic_path(target) as tmp:
        if start is not None:
            start.wait()
        with open(tmp, "wb") as handle:
            for _ in range(64):
                handle.write(bytes([version]) * (PAYLOAD_BYTES // 64))


def write_folder_version(target: str, version: int, start: threading.Barrier) -> None:
    """Write ``target`` as a folder of three files, all holding ``version``."""
    with atomic_path(target) as tmp:
        start.wait()
        tmp.mkdir()
        for name in ("a", "b", "c"):
            (tmp / name).write_text(str(version))


def assert_one_complete_version(target: Path) -> None:
    data = target.read_bytes()
    assert len(data) == PAYLOAD_BYTES, "the file is one complete write"
    assert set(data) in ({0}, {1}), "the file is one writer's version, not a mix"
    assert [p.name for p in target.parent.iterdir()] == [target.name], "no temporary is left behind"


def run_in_threads(write, target: Path) -> list[BaseException]:
    """Run ``write(target, version, barrier)`` in one thread per writer; the errors they raised."""
    start, errors = threading.Barrier(WRITERS), []

    def run(version: int) -> None:
        try:
            write(str(target), version, start)
        except BaseException as error:  # reported by the caller's assertion
            errors.append(error)

    threads = [threading.Thread(target=run, args=(v,)) for v in range(WRITERS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return errors


def test_two_threads_writing_one_file_both_succeed(tmp_path):
    target = tmp_path / "out.bin"
    assert run_in_threads(write_version, target) == []
    assert_one_complete_version(target)


def test_two_processes_writing_one_file_both_succeed(tmp_path):
    target = tmp_path / "out.bin"
    context = multiprocessing.get_context("spawn")
    processes = [context.Process(target=write_version, args=(str(target), v)) for v in range(WRITERS)]
    for process in processes:
        process.start()
    for process in processes:
        process.join()
    assert [p.exitcode for p in processes] == [0] * WRITERS
    assert_one_complete_version(target)


def test_two_threads_replacing_one_folder_both_succeed(tmp_path):
    target = tmp_path / "folder"
    target.mkdir()
    (target / "old").write_text("previous version")
    assert run_in_threads(write_folder_version, target) == []
    assert sorted(p.name for p in target.iterdir()) == ["a", "b", "c"], "no mix with the old version"
    assert len({(target / n).read_text() for n in ("a", "b", "c")}) == 1, "all files from one writer"
    assert [p.name for p in tmp_path.iterdir()] == ["folder"], "no temporary or old folder is left behind"


def test_temporaries_are_unique_per_writer_and_next_to_the_target(tmp_path):
    first, second = unique_temporary(tmp_path / "a.json"), unique_temporary(tmp_path / "a.json")
    assert first != second and first.parent == second.parent == tmp_path
    assert first.name.startswith("a.json.") and first.name.endswith(".tmp")


def test_a_failed_write_leaves_the_target_untouched(tmp_path):
    target = tmp_path / "data.json"
    write_json_atomic(target, {"version": 1})
    with pytest.raises(RuntimeError, match="writer failed"), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("writer failed")
    assert json.loads(target.read_text()) == {"version": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["data.json"]


def test_temporaries_of_dead_writers_are_removed_live_ones_kept(tmp_path):
    target = tmp_path / "data.json"
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(finished.stdout)
    live = unique_temporary(target)  # this process's
    dead = live.with_name(live.name.replace(f"-{os.getpid()}-", f"-{dead_pid}-"))
    other_host = target.with_name("data.json.otherhost-1-abcd.tmp")
    for path in (live, dead, other_host):
        path.write_text("partial")
    remove_stale_temporaries(target)
    assert not dead.exists(), "a dead writer's temporary is removed"
    assert live.exists() and other_host.exists(), "a running writer's and another host's are kept"
