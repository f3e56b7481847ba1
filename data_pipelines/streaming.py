"""Webdataset pipelines over shard lists: split by node and worker, shuffle, decode, batch.

Corrupt samples are skipped by a :class:`SkipCounter`, which logs each one with its shard and key
and fails the run once more than ``max_skipped`` are seen (counts are per loader process).
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset

from data_pipelines.errors import DataError

log = logging.getLogger(__name__)


class TooManyCorruptSamples(DataError):
    """More corrupt samples than the configured limit."""


class SkipCounter:
    """A webdataset exception handler that logs, counts and skips bad samples.

    Args:
        max_skipped: the most samples one process may skip before the run fails.
    """

    def __init__(self, max_skipped: int = 100) -> None:
        self.max_skipped = max_skipped
        self.skipped = 0

    def __call__(self, error: Exception) -> bool:
        self.skipped += 1
        log.warning("skipped corrupt sample %d: %s", self.skipped, error)
        if self.skipped > self.max_skipped:
            raise TooManyCorruptSamples(
                f"{self.skipped} corrupt samples skipped, more than max_skipped={self.max_skipped}; last: {error}"
            ) from error
        return True


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
) -> wds.DataPipeline | EpochSlices:
    """A pipeline yielding collated batches from shards.

    Args:
        urls: shard paths.
        decode: maps a raw webdataset sample (``__key__``, ``__url__``, member bytes) to a decoded
            sample; raising skips the sample through ``handler``.
        batch_size: samples per batch.
        collate: list of decoded samples -> batch.
        handler: counts and logs skipped samples.
        shuffle_buffer: samples held for shuffling (0: none).
        resampled: draw shards with replacement, endlessly: every rank and worker sees an equal,
            unbounded stream, served in epochs of ``batches_per_epoch`` that continue one another
            (the shuffle buffer is not refilled, no sample read is dropped). Without it, shards
            are split between nodes and workers and read once per epoch in order.
        seed: seed of shard resampling and sample shuffling.
        batches_per_epoch: batches each loader worker yields per epoch (needed with ``resampled``).
        partial_batches: keep the last, smaller batch of an epoch.
    """
    if resampled:
        stages: list[Any] = [wds.ResampledShards(list(urls), seed=seed, deterministic=True)]
    else:
        stages = [wds.SimpleShardList(list(urls)), wds.split_by_node, wds.split_by_worker]
    stages.append(wds.tarfile_to_samples(handler=handler))
    if shuffle_buffer > 0:
        stages.append(wds.shuffle(shuffle_buffer, initial=min(shuffle_buffer, 100), seed=seed))
    stages += [
        wds.map(decode, handler=handler),
        wds.batched(batch_size, collation_fn=collate, partial=partial_batches),
    ]
    pipeline = wds.DataPipeline(*stages)
    if resampled:
        if batches_per_epoch is None:
            raise ValueError("resampled streams are endless: give batches_per_epoch")
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
            return super().__iter__()
        self._restart_stream()
        return self._skipping(*plan)

    def _restart_stream(self) -> None:
        """Start the stream from its beginning (workers restart with fresh copies of the dataset)."""
        iterator = self._iterator
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()
        self._iterator = None
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
