"""Webdataset pipelines over shard lists: split by node and worker, shuffle, decode, batch, and
serve endless streams in epochs that continue one another; several streams mixed sample by sample.

Shards are opened by :mod:`data_pipelines.shards.shard_reading` (retries, object-store URLs);
bad samples are skipped and counted by :mod:`data_pipelines.shards.corrupt_samples`; the loader
that resumes partway into a stream is :mod:`data_pipelines.shards.resumable_loader`.
"""

from __future__ import annotations

import copy
import math
import random
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import webdataset as wds
from torch.utils.data import IterableDataset
from webdataset.utils import pytorch_worker_info

from data_pipelines.shards.corrupt_samples import CountedDecode, SkipCounter
from data_pipelines.shards.shard_reading import ShardSamples
from lf_common.errors import ConfigError


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
    stages = sample_stages(
        urls,
        decode,
        handler=handler,
        shuffle_buffer=shuffle_buffer,
        resampled=resampled,
        seed=seed,
        samples_per_shard=samples_per_shard,
        shard_retries=shard_retries,
        shard_retry_delay_s=shard_retry_delay_s,
    )
    stages += [
        batcher or wds.batched(batch_size, collation_fn=collate, partial=partial_batches),
        wds.map(handler.attach_counts),
    ]
    pipeline = wds.DataPipeline(*stages)
    if resampled:
        if batches_per_epoch is None:
            raise ConfigError("resampled streams are endless: give batches_per_epoch")
        return EpochSlices(pipeline, batches_per_epoch)
    return pipeline


def sample_stages(
    urls: Sequence[str],
    decode: Callable[[dict[str, Any]], Any],
    *,
    handler: SkipCounter,
    shuffle_buffer: int = 0,
    resampled: bool = False,
    seed: int = 0,
    samples_per_shard: int = 1,
    shard_retries: int = 3,
    shard_retry_delay_s: float = 1.0,
) -> list[Any]:
    """The stages of :func:`shard_stream` up to batching: shard list -> decoded (shuffled) samples.

    Arguments as :func:`shard_stream`'s.
    """
    if resampled:
        stages: list[Any] = [wds.ResampledShards(list(urls), seed=seed, deterministic=True)]
    else:
        stages = [wds.SimpleShardList(list(urls)), wds.split_by_node, wds.split_by_worker]
    stages.append(ShardSamples(handler, samples_per_shard, shard_retries, shard_retry_delay_s))
    if shuffle_buffer > 0:
        stages.append(wds.shuffle(shuffle_buffer, initial=min(shuffle_buffer, 100), seed=seed))
    stages.append(wds.map(CountedDecode(decode, handler), handler=handler))
    return stages


def mixed_stream(
    sources: Sequence[Iterable[Any]],
    probs: Sequence[float],
    batcher: Callable[[Iterable[Any]], Iterator[Any]],
    *,
    handler: SkipCounter,
    seed: int,
    batches_per_epoch: int,
) -> EpochSlices:
    """Endless sample streams (one per dataset, e.g. pipelines of :func:`sample_stages` over resampled shards)
    mixed sample by sample with probabilities ``probs``, then batched (a bucket batcher keeps every batch one
    shape), served in epochs of ``batches_per_epoch`` like :func:`shard_stream`'s resampled streams.

    The draw is :class:`SeededRandomMix`'s: a function of ``seed``, the rank and the loader worker, so the
    mixed stream replays exactly (resume skips its consumed batches).
    """
    pipeline = wds.DataPipeline(SeededRandomMix(list(sources), probs, seed), batcher, wds.map(handler.attach_counts))
    return EpochSlices(pipeline, batches_per_epoch)


class SeededRandomMix(wds.RandomMix):
    """``webdataset``'s ``RandomMix`` (each sample from source ``i`` with probability ``probs[i]``), drawn from
    its own generator seeded by ``seed``, the rank and the loader worker.

    ``RandomMix`` draws from the global ``random`` module, which a ``DataLoader`` reseeds from its generator
    at every new iterator (and a restarted stream is a new iterator): its draw is not a function of the
    seed, rank and worker alone. The stream ends when a source ends (endless sources: never).
    """

    def __init__(self, datasets: list[Iterable[Any]], probs: Sequence[float], seed: int) -> None:
        super().__init__(datasets, list(probs), longest=False)
        self.datasets, self.probs, self.seed = list(datasets), list(probs), seed  # ours, whatever RandomMix keeps

    def __iter__(self) -> Iterator[Any]:
        rank, _, worker, _ = pytorch_worker_info()
        rng = random.Random(self.seed * 1_000_003 + rank * 7_919 + worker)
        cumulative = np.cumsum(self.probs) / np.sum(self.probs)
        sources = [iter(d) for d in self.datasets]
        while True:
            index = min(int(np.searchsorted(cumulative, rng.random(), side="right")), len(sources) - 1)
            try:
                yield next(sources[index])
            except StopIteration:
                return


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
