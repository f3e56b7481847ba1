"""The hang watchdog: a thread on every rank that turns a silent stall into an error naming the rank and phase.

Every ``interval_s`` the thread of each rank

* stops this rank when another rank reported a failure (:meth:`RankBoard.report_failure`), with
  that rank's message, instead of waiting in a collective for the process-group timeout;
* publishes beats for an *alive* phase, counts the growth of a file being written as progress, and
  publishes progress the main thread noted but did not publish (it publishes at most once per interval);
* stops the run when this rank's own watched phase made no progress for ``timeout_s``: a rank
  that hangs, or one that waits in a collective for a rank that hangs. The log line names the rank
  that has been without progress longest, its phase and step, and every rank's state; the
  traceback of this rank's threads follows on stderr.

Stopping is ``os._exit`` with :data:`HUNG_EXIT_CODE`: the main thread may be blocked inside a
collective, where no exception reaches it. torchrun restarts the group (``--max-restarts``) and the
run resumes from its newest checkpoint. The process group's own timeout is set a minute longer
(``conf/strategy``), so this message comes first.
"""

from __future__ import annotations

import faulthandler
import logging
import os
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from lf_common.storage import path_size
from trainer.faults.ranks import RankBoard, current_board, restart_prefix, set_board
from trainer.faults.torch_private import default_store

log = logging.getLogger(__name__)

HUNG_EXIT_CODE = 1


class Watchdog(threading.Thread):
    """The watchdog thread of one rank (a daemon: it never keeps a process alive).

    Args:
        board: this rank's board.
    """

    def __init__(self, board: RankBoard) -> None:
        super().__init__(name=f"latentforge-watchdog-rank{board.rank}", daemon=True)
        self.board = board
        self.armed = False  # watched phases are checked only once armed (after the first optimizer step)
        self._stop_event = threading.Event()
        self._growing: tuple[Path, int] | None = None

    def stop(self) -> None:
        """End the thread at its next wake-up."""
        self._stop_event.set()

    def run(self) -> None:
        store = self.board.store.clone() if hasattr(self.board.store, "clone") else self.board.store
        while not self._stop_event.wait(self.board.interval_s):
            try:
                self.check(store)
            except Exception as error:  # the store went away with the job: nothing left to watch
                log.debug("watchdog: %s", error)
                return

    def check(self, store: object) -> None:
        """One look: a peer's failure, this rank's alive phase or growing file, and its own progress."""
        board = self.board
        if (failure := board.failure(store)) is not None:
            self.fail(f"stopping rank {board.rank}: {failure}")
        if board.alive:
            board.progress(store=store)
        elif board.growing is not None:
            size = path_size(board.growing)
            if self._growing is None or self._growing != (board.growing, size):
                self._growing = (board.growing, size)
                board.progress(store=store)
        board.flush(store)  # progress the main thread noted since it last published
        if self.armed and board.watched and board.idle_s() > board.timeout_s:
            diagnosis = board.diagnosis(store)
            faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
            self.fail(f"hang: {diagnosis}; stopping rank {board.rank}")

    def fail(self, message: str) -> None:
        """Log ``message``, flush, and end the process with :data:`HUNG_EXIT_CODE`."""
        log.error(message)
        print(message, file=sys.stderr, flush=True)
        for handler in logging.getLogger().handlers:
            handler.flush()
        os._exit(HUNG_EXIT_CODE)


def start_board(rank: int, world_size: int, timeout_s: float) -> Watchdog | None:
    """Make a board on the process group's store this process's board and start its watchdog (not armed);
    ``None`` (and no board) for one process or without a process group."""
    if world_size == 1 or not torch.distributed.is_initialized():
        return None
    board = RankBoard(default_store(), rank, world_size, timeout_s, restart_prefix())
    set_board(board)
    watchdog = Watchdog(board)
    watchdog.start()
    return watchdog


@contextmanager
def guarded_ranks(rank: int, world_size: int, timeout_s: float) -> Iterator[None]:
    """A board and watchdog for the block, where no hang guard runs yet (a data module's ``setup`` runs before
    the callbacks'): single-rank work in the block meets through the store (:func:`~trainer.faults.ranks.all_ranks`,
    :func:`~trainer.faults.ranks.single_rank_work`). Keeps a board that already runs; no-op for one process."""
    if current_board() is not None:
        yield
        return
    watchdog = start_board(rank, world_size, timeout_s)
    try:
        yield
    finally:
        if watchdog is not None:
            watchdog.stop()
            watchdog.join(timeout=10)  # no late publication over the board that the hang guard starts next
            set_board(None)
