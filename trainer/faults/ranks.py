"""What every rank of a multi-process run is doing, where the other ranks can read it: the phase board.

Each rank publishes its phase (``first step``, ``training``, ``validation``, ``validation images``,
``checkpoint save``, ...), its step and when it last made progress, as one key of the process group's
key-value store (the TCPStore torch.distributed already runs: nothing to set up, no shared files).
Progress is a training step, a validation batch, bytes written to a checkpoint; a record is
published when the phase changes and, within a phase, at most once per ``interval_s``.

A phase is one of three kinds:

* *watched* (the default): progress comes from the work; the watchdog
  (:mod:`trainer.faults.watchdog`) stops the run when there is none for ``timeout_s``;
* *alive*: work that reports no progress (a FLOP count, sampling validation images): the watchdog
  publishes beats for it while the process lives, and never stops it;
* a *meeting* (:func:`meet`): the rank waits for the others through the store instead of a
  process-group collective and monitors them itself.

Meetings are how long single-rank work (rank 0 sampling validation images or writing a DDP
checkpoint) stays clear of the process-group timeout: the other ranks wait in :func:`meet`, which
has no timeout of its own while the ranks it waits for make progress, and which raises
:class:`RankHangError` naming the rank and its phase when they make none for ``timeout_s``, or
:class:`PeerFailedError` with a peer's own error when one fails (:func:`report_failure`).

Without a process group (one process) every function here is a no-op.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lf_common.errors import DataError

log = logging.getLogger(__name__)

_FAILURES = "failures"
MEETING = "waiting for the other ranks after "
"""The phase of a rank in a meeting: ``waiting for the other ranks after '<name>'``."""


class RankHangError(RuntimeError):
    """A rank made no progress for longer than ``distributed.timeout_s``."""


class PeerFailedError(RuntimeError):
    """Another rank of the run failed; its message is in this one."""


@dataclass
class RankRecord:
    """One rank's entry on the board, as another rank reads it.

    Attributes:
        rank: the global rank.
        phase: what it is doing.
        step: the optimizer step it is at.
        idle_s: seconds since its last progress (as published; up to ``interval_s`` more).
    """

    rank: int
    phase: str
    step: int
    idle_s: float

    def describe(self) -> str:
        return f"rank {self.rank} in '{self.phase}' at step {self.step}, {self.idle_s:.0f} s without progress"


class RankBoard:
    """This rank's phase, published to the store; the others' phases, read from it.

    Args:
        store: the process group's store (``trainer.faults.torch_private.default_store()``).
        rank: this process's global rank.
        world_size: ranks in the run.
        timeout_s: no progress for this long is a hang.
        prefix: keys go under ``<prefix>/`` (a run restarted by torchrun reuses its agent's store).
    """

    def __init__(self, store: Any, rank: int, world_size: int, timeout_s: float, prefix: str = "lf") -> None:
        if timeout_s <= 0:
            raise ValueError(f"distributed.timeout_s={timeout_s}: expected a positive number of seconds")
        self.store = store
        self.rank = rank
        self.world_size = world_size
        self.timeout_s = timeout_s
        self.interval_s = min(15.0, max(0.2, timeout_s / 20))
        self.prefix = prefix
        self.phase = "setup"
        self.step = 0
        self.watched = False
        self.alive = True
        self.growing: Path | None = None  # a file or folder being written: its growth is progress
        self.progress_at = time.monotonic()  # this rank's last progress, for its own watchdog
        self._published_at = 0.0
        self._progress_wall = time.time()
        self._published: dict[str, Any] = {}
        self._meetings: dict[str, int] = {}
        self.failure_reported = False
        self._lock = threading.Lock()  # the main thread and the watchdog both publish
        self.publish(force=True)

    def key(self, *parts: object) -> str:
        return "/".join([self.prefix, *(str(p) for p in parts)])

    # -- this rank ------------------------------------------------------------------------------
    def enter(self, phase: str, step: int, watched: bool = True, alive: bool = False) -> tuple[str, int, bool, bool]:
        """Start ``phase`` at ``step`` (counts as progress); returns the state to restore with :meth:`restore`."""
        previous = (self.phase, self.step, self.watched, self.alive)
        self.phase, self.step, self.watched, self.alive = phase, step, watched and not alive, alive
        self.progress(force=True)
        return previous

    def restore(self, state: tuple[str, int, bool, bool]) -> None:
        """Return to a phase :meth:`enter` left (counts as progress)."""
        self.phase, self.step, self.watched, self.alive = state
        self.progress(force=True)

    def progress(self, step: int | None = None, force: bool = False, store: Any | None = None) -> None:
        """Note progress in the current phase (at ``step`` when given); publish when due (through ``store``
        when given: another thread uses its own clone of the store)."""
        if step is not None:
            self.step = step
        self.progress_at = time.monotonic()
        self._progress_wall = time.time()
        self.publish(force, store)

    def publish(self, force: bool = False, store: Any | None = None) -> None:
        """Write this rank's record to the store (at most once per ``interval_s`` unless ``force``)."""
        now = time.monotonic()
        if not force and now - self._published_at < self.interval_s:
            return
        self._published_at = now
        record = {"phase": self.phase, "step": self.step, "progress": self._progress_wall}
        with self._lock:
            (store or self.store).set(self.key("rank", self.rank), json.dumps(record))
            self._published = record

    def flush(self, store: Any | None = None) -> None:
        """Publish what changed since the last publication (the watchdog calls this every ``interval_s``)."""
        if self._published != {"phase": self.phase, "step": self.step, "progress": self._progress_wall}:
            self.publish(force=True, store=store)

    def idle_s(self) -> float:
        """Seconds since this rank's last progress."""
        return time.monotonic() - self.progress_at

    # -- the other ranks ------------------------------------------------------------------------
    def records(self, store: Any | None = None, ranks: list[int] | None = None) -> list[RankRecord]:
        """The records of ``ranks`` (default: all; ranks that never published are left out)."""
        store = store or self.store
        now, found = time.time(), []
        for rank in range(self.world_size) if ranks is None else ranks:
            key = self.key("rank", rank)
            if not store.check([key]):
                continue
            record = json.loads(store.get(key))
            found.append(RankRecord(rank, record["phase"], record["step"], max(0.0, now - record["progress"])))
        return found

    def report_failure(self, message: str) -> None:
        """Tell the other ranks this one failed (their meetings and watchdogs stop with ``message``)."""
        if self.failure_reported:
            return
        self.failure_reported = True
        with self._lock:
            self.store.set(self.key(_FAILURES, self.rank), f"rank {self.rank} failed in '{self.phase}': {message}")
            self.store.add(self.key(_FAILURES), 1)

    def failure(self, store: Any | None = None) -> str | None:
        """The first failure another rank reported, or ``None``."""
        store = store or self.store
        if store.add(self.key(_FAILURES), 0) == 0:
            return None
        for rank in range(self.world_size):
            key = self.key(_FAILURES, rank)
            if rank != self.rank and store.check([key]):
                return store.get(key).decode()
        return None

    def diagnosis(self, store: Any | None = None) -> str:
        """Which rank stopped making progress, in which phase, and every rank's state: one line."""
        records = self.records(store)
        if not records:
            return f"rank {self.rank} made no progress for {self.idle_s():.0f} s in '{self.phase}' at step {self.step}"
        stuck = max(records, key=lambda r: r.idle_s)
        ranks = "; ".join(r.describe() for r in records)
        return (
            f"rank {stuck.rank} made no progress for {stuck.idle_s:.0f} s in '{stuck.phase}' at step {stuck.step}, "
            f"longer than distributed.timeout_s={self.timeout_s:g} (ranks: {ranks}); "
            "a phase that is slow on purpose needs a larger distributed.timeout_s, otherwise the log of "
            f"rank {stuck.rank} shows where it hangs"
        )

    # -- meetings -------------------------------------------------------------------------------
    def meet(self, name: str, workers: list[int] | None = None) -> None:
        """Wait until every rank has reached meeting ``name`` (the n-th of that name), through the store.

        Waiting counts as progress while the ranks that may still work (``workers``, default all)
        make progress; ranks already waiting in a meeting do not count.

        Raises:
            PeerFailedError: another rank reported a failure.
            RankHangError: the ranks not yet here made no progress for ``timeout_s``.
        """
        number = self._meetings.get(name, 0)
        self._meetings[name] = number + 1
        key = self.key("meet", name, number)
        others = [r for r in range(self.world_size) if r != self.rank]
        watch = [r for r in (workers if workers is not None else others) if r != self.rank] or others
        if self.store.add(key, 1) == self.world_size:
            self.store.set(f"{key}/all", "1")  # the last to arrive wakes the others
        state = self.enter(f"{MEETING}'{name}'", self.step, watched=False)
        try:
            pause, checked_at = 0.001, time.monotonic()
            while not self.store.check([f"{key}/all"]):
                time.sleep(pause)
                pause = min(pause * 2, 0.5, self.interval_s / 2)  # quick for short waits, light for long ones
                if time.monotonic() - checked_at < self.interval_s:
                    continue
                checked_at = time.monotonic()
                if (failure := self.failure()) is not None:
                    raise PeerFailedError(failure)
                working = [r for r in self.records(ranks=watch) if not r.phase.startswith(MEETING)]
                if any(r.idle_s < self.timeout_s for r in working):
                    self.progress()  # the others still work: waiting for them is progress
                elif self.idle_s() > self.timeout_s:
                    raise RankHangError(self.diagnosis())
        finally:
            self.restore(state)


_board: RankBoard | None = None


def set_board(board: RankBoard | None) -> None:
    """Make ``board`` this process's board (``None``: none; every function here becomes a no-op)."""
    global _board
    _board = board


def current_board() -> RankBoard | None:
    """This process's board, or ``None`` (one process, or the hang guard is off)."""
    return _board


@contextmanager
def phase(name: str, step: int, alive: bool = False) -> Iterator[None]:
    """Run the block as phase ``name``: watched (it must report :func:`progress`), or ``alive`` (it cannot)."""
    board = _board
    if board is None:
        yield
        return
    state = board.enter(name, step, alive=alive)
    try:
        yield
    finally:
        board.restore(state)


def progress(step: int | None = None) -> None:
    """Note progress of this rank's current phase."""
    if _board is not None:
        _board.progress(step)


@contextmanager
def single_rank_work(name: str, step: int, worker: int | None = 0, growing: str | Path | None = None) -> Iterator[None]:
    """Every rank runs the block (rank ``worker`` does the work, the others skip it; ``None``: every rank
    works, for as long as it takes on each), then all meet.

    The block is an *alive* phase, or, with ``growing`` (the file or folder the block writes), a
    watched one whose progress is that path's growth; the meeting after it replaces a process-group
    barrier, so the ranks that skip the work wait in the store as long as the worker progresses. A
    failure inside the block is reported to the other ranks before it propagates.
    """
    board = _board
    if board is None:
        yield
        return
    state = board.enter(name, step, alive=growing is None)
    board.growing = Path(growing) if growing is not None else None
    try:
        yield
    except BaseException as error:
        board.report_failure(f"{type(error).__name__}: {error}")
        raise
    finally:
        board.growing = None
        board.restore(state)
    board.meet(name, workers=[worker] if worker is not None else None)


def all_ranks(strategy: Any, step: str, work: Callable[[], object] | None, worker: int | None = None) -> None:
    """Run ``work`` on this rank (``None``: nothing to do here), then agree across the ranks that every
    rank succeeded: a failure on any rank fails all of them, so none is left waiting in a later collective.

    With a board (:func:`current_board`) the ranks meet through the store (:func:`single_rank_work`), so
    work of any length on some ranks (``worker``, or every rank when ``None``) never trips the process
    group's timeout on the others; without one (one process, or before the board is set up) they agree
    in one collective (``strategy.reduce_boolean_decision``).

    Args:
        strategy: the job's Lightning strategy (its collective is used without a board).
        step: what the work is, named in errors and as the phase.
        work: this rank's part, or ``None``.
        worker: the rank doing long work the others wait for; ``None``: every rank works.

    Raises:
        PeerFailedError: ``step`` failed on another rank (its message; this rank's own error is raised as it is).
        RankHangError: the ranks still working made no progress for ``timeout_s`` (a dead rank).
        DataError: ``step`` failed on another rank (without a board: no message to pass on).
    """
    if (board := _board) is not None:
        with single_rank_work(step, board.step, worker=worker):
            if work is not None:
                work()
        return
    error: Exception | None = None
    try:
        if work is not None:
            work()
    except Exception as exc:  # re-raised below, after the other ranks have heard of it
        error = exc
    if not strategy.reduce_boolean_decision(error is None, all=True):
        if error is not None:
            raise error
        raise DataError(f"{step} failed on another rank; that rank's log says why")


def restart_prefix() -> str:
    """The store prefix of this start of the job: torchrun restarts a failed group with the same store."""
    return f"lf/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
