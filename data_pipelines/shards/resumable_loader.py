"""The training ``DataLoader``: starts partway into its stream for an exact resume, and names a loader
worker that died.

A loader worker process that dies (the kernel's out-of-memory killer, mostly) stops the run with an
error naming it and what to change (:class:`LoaderWorkerDied`): PyTorch reports a dead worker from
its SIGCHLD handler, in whatever the main thread runs at that moment (the forward pass, an optimizer
step), or from the loader's next fetch; both reports become that error.
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.connection
import os
import re
import signal
import threading
from collections.abc import Callable, Iterator
from typing import Any

from torch.utils.data import DataLoader

from data_pipelines.shards.streaming import EpochSlices
from data_pipelines.shards.torch_private import restart_workers
from lf_common.errors import DataError

log = logging.getLogger(__name__)


class LoaderWorkerDied(RuntimeError):
    """A data-loader worker process ended without an error of its own (killed, mostly by the OOM killer)."""


_PIDS = re.compile(r"pid(?:\(s\))? ([\d, ]+)")  # PyTorch: "worker (pid 12) is killed", "worker(s) pid(s) 12, 13 exited"
_REPORTED_DEAD_WORKERS: set[str] = set()
"""The pids of the loader workers this process has reported dead (as :class:`LoaderWorkerDied`)."""


def _worker_pids(message: str) -> set[str]:
    """The worker pids a PyTorch dead-worker message names."""
    return {pid for run in _PIDS.findall(message) for pid in re.findall(r"\d+", run)}


def _raise_named(error: RuntimeError, num_workers: int) -> None:
    """Raise :class:`LoaderWorkerDied` for PyTorch's "DataLoader worker (pid ...)" error, other errors as they are."""
    if "DataLoader worker" not in str(error) or isinstance(error, LoaderWorkerDied):
        raise error
    _REPORTED_DEAD_WORKERS.update(_worker_pids(str(error)))
    rank = os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))
    raise LoaderWorkerDied(
        f"rank {rank}: a data-loader worker died ({error}); killed by signal 9 (Killed) is most often the "
        "kernel's out-of-memory killer (see dmesg): lower data.num_workers or data.shuffle_buffer, or give "
        f"the job more memory (data.num_workers={num_workers}), then run the same command again to "
        "resume from the newest checkpoint (auto_resume=true)"
    ) from error


def _name_dead_workers_in_sigchld(num_workers: int) -> None:
    """Wrap the SIGCHLD handler PyTorch's loader installed so that its dead-worker error is :class:`LoaderWorkerDied`.

    PyTorch raises that error from the handler, wherever the main thread is when the worker dies; no
    iterator sees it. Once per process (the handler is the process's), from the main thread only.

    A dead worker is reported once: PyTorch's handler raises again at every later SIGCHLD (any child
    process ending) until the dead worker's iterator is shut down, which the error's traceback may
    keep from happening for a while; those repeats are dropped.
    """
    if threading.current_thread() is not threading.main_thread():
        return
    handler = signal.getsignal(signal.SIGCHLD)
    if not callable(handler) or getattr(handler, "names_dead_workers", False):
        return

    def naming(signum: int, frame: Any) -> None:
        try:
            handler(signum, frame)
        except RuntimeError as error:
            pids = _worker_pids(str(error))
            if pids and pids <= _REPORTED_DEAD_WORKERS:
                return
            _raise_named(error, num_workers)

    naming.names_dead_workers = True  # type: ignore[attr-defined]
    signal.signal(signal.SIGCHLD, naming)


class ResumableLoader(DataLoader):
    """A ``DataLoader`` that can start partway into its stream (exact resume).

    ``resume_plan`` (set by the data module) says, at each ``__iter__`` until the first training
    batch after a resume is consumed, how many batches to skip and whether to go on into the next
    epoch when the skip ends exactly at an epoch's end (else that epoch's rest is empty). The
    stream is deterministic (seeded shard draws and shuffle, per rank and worker), so the loader
    restarts it from its beginning and drops the consumed batches in the main process, across as
    many epochs as they span. Lightning may start an iterator and drop it unconsumed while it
    restores its loops; the next one restarts the stream again, so nothing prefetched is lost.
    Dropping in the main process keeps the DataLoader's round-robin order over workers, so the
    batches that follow are the ones an uninterrupted run would have seen, for any
    ``num_workers``. Skipped batches are read and decoded, not trained on: a resume costs about
    the loader's time for the data consumed.
    """

    resume_plan: Callable[[], tuple[int, bool] | None] | None = None

    def __iter__(self) -> Iterator[Any]:
        plan = self.resume_plan() if self.resume_plan is not None else None
        if plan is None or plan == (0, False):
            iterator = super().__iter__()
        else:
            self._restart_stream()
            iterator = self._skipping(*plan)
        return iterator if self.num_workers == 0 else self._naming_dead_workers(iterator)

    def _naming_dead_workers(self, iterator: Iterator[Any]) -> Iterator[Any]:
        """``iterator``, with the loader's "worker exited unexpectedly" error turned into :class:`LoaderWorkerDied`
        (the error PyTorch's SIGCHLD handler raises elsewhere in the main thread too, once the iterator started
        the workers and that handler)."""
        try:
            first = next(iterator)
        except StopIteration:
            return
        except RuntimeError as error:
            _raise_named(error, self.num_workers)
        _name_dead_workers_in_sigchld(self.num_workers)  # the workers and PyTorch's handler exist now
        children = multiprocessing.active_children()  # this iterator's workers among them
        try:
            yield first
            yield from iterator
        except RuntimeError as error:
            _raise_named(error, self.num_workers)
        except (ConnectionError, EOFError) as error:  # a batch's sender died mid-transfer, before it was seen dead
            ended = multiprocessing.connection.wait([child.sentinel for child in children], timeout=10)
            dead = [child for child in children if child.sentinel in ended]
            if not dead:
                raise
            pids = ", ".join(f"pid {child.pid}, exit code {child.exitcode}" for child in dead)
            _raise_named(
                RuntimeError(f"DataLoader worker ({pids}) ended while sending a batch: {error!r}"), self.num_workers
            )

    def _restart_stream(self) -> None:
        """Start the stream from its beginning (workers restart with fresh copies of the dataset)."""
        restart_workers(self)
        if isinstance(self.dataset, EpochSlices):
            self.dataset.restart()

    def _skipping(self, skip: int, past_epoch_end: bool) -> Iterator[Any]:
        skipped = 0
        while skipped < skip:
            iterator = super().__iter__()
            in_epoch = 0
            for _ in iterator:
                skipped += 1
                in_epoch += 1
                if skipped == skip:
                    break
            if in_epoch == 0:
                raise DataError(f"cannot skip {skip} batches to resume: the stream ended after {skipped}")
        log.info("data stream resumed after %d batches", skip)
        first = next(iterator, None) if skip else None
        if first is not None:
            yield first
            yield from iterator
        elif past_epoch_end or not skip:
            yield from super().__iter__()
