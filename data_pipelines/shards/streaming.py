"""Webdataset pipelines over shard lists: split by node and worker, shuffle, decode, batch.

Corrupt samples are skipped by a :class:`SkipCounter`, which logs each one with its shard and key,
counts it, and fails the run once more than ``max_bad_fraction`` of the samples read are bad (the
fraction is taken over at least ``min_samples`` samples, so a bad sample early in a run does not
fail it on its own). Counts are kept per loader process; each batch carries its process's new
counts under :data:`COUNTS_KEY`, which the data modules take off and add up in the main process
(:class:`SampleCounts`), where :class:`~data_pipelines.loading.monitoring.SkippedSamplesMonitor` logs them.
Samples a worker reads after its last batch of an epoch (a dropped partial batch) reach the limit
check but not the logged counts.

A shard that cannot be opened (it disappeared, the file system is failing) is tried again
``shard_retries`` times, waiting longer each time; then it is skipped and counted as about as many
bad samples as a shard holds, within the same ``max_bad_fraction`` (:class:`ShardSamples`). A
loader worker process that dies (the kernel's out-of-memory killer, mostly) stops the run with an
error naming it and what to change (:class:`LoaderWorkerDied`): PyTorch reports a dead worker from
its SIGCHLD handler, in whatever the main thread runs at that moment (the forward pass, an optimizer
step), or from the loader's next fetch; both reports become that error.
"""

from __future__ import annotations

import copy
import logging
import math
import multiprocessing
import multiprocessing.connection
import os
import re
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset
from webdataset.gopen import gopen
from webdataset.tariterators import group_by_keys, tar_file_expander

from lf_common.errors import ConfigError, DataError
from lf_common.upstream.torch_private import restart_workers

log = logging.getLogger(__name__)
COUNTS_KEY = "__sample_counts__"  # (2,) int64 in a batch: samples read and samples skipped since the last batch


class TooManyCorruptSamples(DataError):
    """More corrupt samples than the configured fraction."""


class LoaderWorkerDied(RuntimeError):
    """A data-loader worker process ended without an error of its own (killed, mostly by the OOM killer)."""


@dataclass
class SampleCounts:
    """Samples read (good and bad) and samples skipped as corrupt.

    Attributes:
        seen: samples read, the skipped ones included.
        skipped: corrupt samples skipped.
    """

    seen: int = 0
    skipped: int = 0

    @property
    def bad_fraction(self) -> float:
        """``skipped / seen`` (0 before anything is read)."""
        return self.skipped / self.seen if self.seen else 0.0

    def add(self, seen: int, skipped: int) -> None:
        """Add the counts another process reported."""
        self.seen += seen
        self.skipped += skipped


class SkipCounter:
    """A webdataset exception handler that logs, counts and skips bad samples, and fails the run
    when too many are bad.

    The run fails when ``skipped > max_bad_fraction * max(seen, min_samples)``.

    Args:
        max_bad_fraction: the largest fraction of the samples read that may be bad.
        min_samples: the fraction is taken over at least this many samples (so up to
            ``max_bad_fraction * min_samples`` bad samples are tolerated at the start of a run).
    """

    def __init__(self, max_bad_fraction: float = 0.01, min_samples: int = 1000) -> None:
        if not 0.0 <= max_bad_fraction <= 1.0:
            raise ConfigError(f"max_bad_fraction={max_bad_fraction}: expected a fraction in [0, 1]")
        self.max_bad_fraction = max_bad_fraction
        self.min_samples = min_samples
        self.counts = SampleCounts()
        self._reported = SampleCounts()

    @property
    def skipped(self) -> int:
        """Corrupt samples skipped so far by this process."""
        return self.counts.skipped

    def count_good(self) -> None:
        """Count one sample that decoded."""
        self.counts.seen += 1

    def __call__(self, error: Exception) -> bool:
        """Count, log and skip the sample ``error`` is about (webdataset's handler protocol).

        Raises:
            TooManyCorruptSamples: the bad fraction is over the limit; names the last bad sample.
        """
        self.counts.add(1, 1)
        log.warning("skipped corrupt sample %d (of %d read): %s", self.counts.skipped, self.counts.seen, error)
        if self._over_limit():
            raise TooManyCorruptSamples(
                f"{self.counts.skipped} of {self.counts.seen} samples read are corrupt, more than "
                f"max_bad_fraction={self.max_bad_fraction} (taken over at least {self.min_samples} samples); "
                f"last: {error}"
            ) from error
        return True

    def _over_limit(self) -> bool:
        return self.counts.skipped > self.max_bad_fraction * max(self.counts.seen, self.min_samples)

    def skip_shard(self, url: str, error: Exception, samples: int) -> None:
        """Count an unreadable shard as ``samples`` bad samples (its estimated size) and log it.

        Raises:
            TooManyCorruptSamples: the bad fraction is over the limit; names the shard.
        """
        self.counts.add(samples, samples)
        log.warning(
            "skipped unreadable shard %s (about %d samples; %d of %d read are bad): %s",
            url,
            samples,
            self.counts.skipped,
            self.counts.seen,
            error,
        )
        if self._over_limit():
            raise TooManyCorruptSamples(
                f"shard {url} is unreadable ({error}); counted as its about {samples} samples, "
                f"{self.counts.skipped} of {self.counts.seen} samples read are bad, more than "
                f"max_bad_fraction={self.max_bad_fraction}; restore the shard or raise data.max_bad_fraction"
            ) from error

    def attach_counts(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Add the counts since the previous batch to ``batch`` under :data:`COUNTS_KEY` (a batching stage)."""
        new = (self.counts.seen - self._reported.seen, self.counts.skipped - self._reported.skipped)
        self._reported = SampleCounts(self.counts.seen, self.counts.skipped)
        batch[COUNTS_KEY] = torch.tensor(new, dtype=torch.int64)
        return batch


def take_counts(batch: dict[str, Any]) -> tuple[int, int]:
    """Remove :data:`COUNTS_KEY` from a batch; ``(seen, skipped)`` it held (zeros when absent)."""
    counts = batch.pop(COUNTS_KEY, None)
    if counts is None:
        return 0, 0
    seen, skipped = (int(v) for v in counts.tolist())
    return seen, skipped


class _CountedDecode:
    """A decode step that counts each sample it decodes (a picklable wrapper)."""

    def __init__(self, decode: Callable[[dict[str, Any]], Any], counter: SkipCounter) -> None:
        self.decode = decode
        self.counter = counter

    def __call__(self, sample: dict[str, Any]) -> Any:
        decoded = self.decode(sample)
        self.counter.count_good()
        return decoded


class ShardSamples:
    """A pipeline stage: shard urls -> samples, opening each shard with retries (a picklable wrapper).

    A shard that cannot be opened is tried ``retries`` more times, ``retry_delay_s`` apart and twice
    that each further time (a file system that hiccups); then it is skipped through
    :meth:`SkipCounter.skip_shard` as ``samples_per_shard`` bad samples. Errors inside a shard
    (a truncated member, a bad sample) go to the handler as before.

    Args:
        handler: the skip counter.
        samples_per_shard: what an unreadable shard counts as.
        retries: further tries of a shard that cannot be opened.
        retry_delay_s: the wait before the first retry (doubling after).
    """

    def __init__(
        self, handler: SkipCounter, samples_per_shard: int = 1, retries: int = 3, retry_delay_s: float = 1.0
    ) -> None:
        self.handler = handler
        self.samples_per_shard = max(1, samples_per_shard)
        self.retries = retries
        self.retry_delay_s = retry_delay_s

    def __call__(self, shards: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        streams = (opened for shard in shards if (opened := self.open(shard)) is not None)
        files = tar_file_expander(streams, handler=self.handler)
        return group_by_keys(files, handler=self.handler)

    def open(self, shard: dict[str, Any]) -> dict[str, Any] | None:
        """``shard`` with its opened ``stream``, or ``None`` when it stayed unreadable (skipped and counted)."""
        url = shard["url"]
        for attempt in range(self.retries + 1):
            try:
                return {**shard, "stream": gopen(url)}
            except OSError as error:
                if attempt == self.retries:
                    self.handler.skip_shard(url, error, self.samples_per_shard)
                    return None
                delay = self.retry_delay_s * 2**attempt
                log.warning("shard %s: %s; try %d of %d in %.1f s", url, error, attempt + 1, self.retries, delay)
                time.sleep(delay)
        return None


def shard_stream(
    urls: Sequence[str],
    decode: Callable[[dict[str, Any]], Any],
    batch_size: int,
    collate: Callable[[list[Any]], Any],
    *,
    handler: SkipCounter,
    shuffle_buffer: int = 0,
    resampled: bool = False,
    seed: int = 0,
    batches_per_epoch: int | None = None,
    partial_batches: bool = False,
    batcher: Callable[[Iterable[Any]], Iterator[Any]] | None = None,
    samples_per_shard: int = 1,
    shard_retries: int = 3,
    shard_retry_delay_s: float = 1.0,
) -> wds.DataPipeline | EpochSlices:
    """A pipeline yielding collated batches from shards.

    Args:
        urls: shard paths.
        decode: maps a raw webdataset sample (``__key__``, ``__url__``, member bytes) to a decoded
            sample; raising skips the sample through ``handler``.
        batch_size: samples per batch.
        collate: list of decoded samples -> batch.
        handler: counts and logs skipped samples; each batch carries its new counts
            (:data:`COUNTS_KEY`, see :func:`take_counts`).
        shuffle_buffer: samples held for shuffling (0: none).
        resampled: draw shards with replacement, endlessly: every rank and worker sees an equal,
            unbounded stream, served in epochs of ``batches_per_epoch`` that continue one another
            (the shuffle buffer is not refilled, no sample read is dropped). Without it, shards
            are split between nodes and workers and read once per epoch in order.
        seed: seed of shard resampling and sample shuffling.
        batches_per_epoch: batches each loader worker yields per epoch (needed with ``resampled``).
        partial_batches: keep the last, smaller batch of an epoch.
        batcher: a pipeline stage (iterator of decoded samples -> iterator of collated batches)
            used instead of plain batching, e.g. :class:`~data_pipelines.transforms.buckets.BucketBatcher`.
        samples_per_shard: about how many samples a shard holds (what an unreadable one counts as).
        shard_retries: further tries of a shard that cannot be opened (see :class:`ShardSamples`).
        shard_retry_delay_s: the wait before the first retry.
    """
    if resampled:
        stages: list[Any] = [wds.ResampledShards(list(urls), seed=seed, deterministic=True)]
    else:
        stages = [wds.SimpleShardList(list(urls)), wds.split_by_node, wds.split_by_worker]
    stages.append(ShardSamples(handler, samples_per_shard, shard_retries, shard_retry_delay_s))
    if shuffle_buffer > 0:
        stages.append(wds.shuffle(shuffle_buffer, initial=min(shuffle_buffer, 100), seed=seed))
    stages += [
        wds.map(_CountedDecode(decode, handler), handler=handler),
        batcher or wds.batched(batch_size, collation_fn=collate, partial=partial_batches),
        wds.map(handler.attach_counts),
    ]
    pipeline = wds.DataPipeline(*stages)
    if resampled:
        if batches_per_epoch is None:
            raise ConfigError("resampled streams are endless: give batches_per_epoch")
        return EpochSlices(pipeline, batches_per_epoch)
    return pipeline


class EpochSlices(IterableDataset):
    """An endless iterable served in epochs of ``items_per_epoch``, each continuing the last.

    ``webdataset``'s ``with_epoch`` starts a new iterator every epoch, which drops whatever the
    shuffle buffer holds and reads it again. Here one iterator lives on (in the loading process,
    or in each persistent DataLoader worker) and every epoch takes the next slice of it.
    """

    def __init__(self, source: Iterable[Any], items_per_epoch: int) -> None:
        self.source = source
        self.items_per_epoch = items_per_epoch
        self._pristine = copy.deepcopy(source)
        self._iterator: Iterator[Any] | None = None

    def restart(self) -> None:
        """Serve the stream from its beginning again (a fresh copy of the source as first built)."""
        self.source = copy.deepcopy(self._pristine)
        self._iterator = None

    def __iter__(self) -> Iterator[Any]:
        if self._iterator is None:
            self._iterator = iter(self.source)
        for _ in range(self.items_per_epoch):
            try:
                yield next(self._iterator)
            except StopIteration:
                self._iterator = None
                return


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


def batches_per_worker(num_samples: int, batch_size: int, world_size: int, num_workers: int) -> int:
    """Batches each worker of each rank yields so that one epoch covers about ``num_samples``."""
    return max(1, math.ceil(num_samples / (batch_size * world_size * max(1, num_workers))))


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
