"""The base of the shard-streaming data modules: their loader settings, the per-step variant draw, and the
stream position saved in checkpoints so a resumed run continues the stream exactly."""

from __future__ import annotations

import logging
import math
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader

from data_pipelines.loading.ranks import rank, world_size
from data_pipelines.loading.variants import draw_variants, variant_generator
from data_pipelines.shards.corrupt_samples import SampleCounts, SkipCounter, take_counts
from data_pipelines.shards.resumable_loader import ResumableLoader
from data_pipelines.shards.streaming import batches_per_worker, shard_stream
from data_pipelines.transforms.buckets import BucketBatcher
from lf_common.errors import DataError

log = logging.getLogger(__name__)


class StreamingDataModule(L.LightningDataModule):
    """Shared loader settings of the shard-streaming data modules, and the stream position.

    The position is the number of training batches this rank has consumed (counted when Lightning
    moves a batch to the device, so batches the loop prefetched are not counted): since the stream
    began for resampled streams (one endless stream served in epochs), since the epoch began
    otherwise. It is saved in checkpoints (``state_dict``) with the settings it depends on, and a
    resumed run's training loader skips that many batches (:class:`ResumableLoader`). The stream
    is a function of the seed, the rank and the worker, so every rank resumes where it stopped.
    """

    def __init__(
        self,
        batch_size: int,
        num_workers: int = 2,
        shuffle_buffer: int = 1000,
        resampled: bool = True,
        seed: int = 0,
        max_bad_fraction: float = 0.01,
        bad_fraction_min_samples: int = 1000,
        shard_retries: int = 3,
        shard_retry_delay_s: float = 1.0,
    ) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.shuffle_buffer = shuffle_buffer
        self.resampled = resampled
        self.seed = seed
        self.max_bad_fraction = max_bad_fraction
        self.bad_fraction_min_samples = bad_fraction_min_samples
        self.shard_retries = shard_retries
        self.shard_retry_delay_s = shard_retry_delay_s
        self.sample_counts = SampleCounts()  # this rank's loaders, all workers, added up
        self._batches = 0  # training batches consumed since the stream began
        self._epoch_batches = 0  # ... since the current epoch began
        self._epoch = 0
        self._resume: dict[str, Any] | None = None  # the restored position, until training consumes a batch

    #: ``(name, default)`` of a subclass's settings that change what the stream draws, saved with the position
    draw_settings: tuple[tuple[str, Any], ...] = ()

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Take the loader workers' sample counts off each batch (into :attr:`sample_counts`), keep one of
        each sample's stored variants (:mod:`data_pipelines.loading.variants`: drawn in training, the first
        in validation), and count the training batches the loop consumes (the stream position)."""
        training = self.trainer is not None and self.trainer.training
        if isinstance(batch, dict):
            self.sample_counts.add(*take_counts(batch))
            draw = variant_generator(self.seed, rank(), self._batches) if training else None
            draw_variants(batch, draw)
        if training:
            self._resume = None
            if self.trainer.current_epoch != self._epoch:
                self._epoch, self._epoch_batches = self.trainer.current_epoch, 0
            self._batches += 1
            self._epoch_batches += 1
        return batch

    def state_dict(self) -> dict[str, Any]:
        """The stream position of this rank and what it depends on."""
        return {
            "batches": self._batches,
            "epoch": self._epoch,
            "epoch_batches": self._epoch_batches,
            "samples": self._batches * self.batch_size,
            "batch_size": self.batch_size,
            "world_size": world_size(),
            "seed": self.seed,
            "resampled": self.resampled,
            "shuffle_buffer": self.shuffle_buffer,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Resume the training stream where the checkpoint left it (the loader skips the consumed batches).

        A stream of other settings (batch size, ranks, seed, shuffle, which stored variants are drawn) is a
        different stream: then the position is not restored and a warning says why.
        """
        now = self.state_dict()
        defaults = dict(self.draw_settings)  # a draw setting a checkpoint predates: the default it was taken with
        stream_keys = ("batch_size", "world_size", "seed", "resampled", "shuffle_buffer", *defaults)
        changed = [k for k in stream_keys if state_dict.get(k, defaults.get(k)) != now[k]]
        if changed:
            log.warning(
                "data position not restored: %s changed since the checkpoint (%s); the stream starts afresh",
                ", ".join(changed),
                ", ".join(f"{k} {state_dict.get(k, defaults.get(k))} -> {now[k]}" for k in changed),
            )
            return
        self._batches, self._epoch, self._epoch_batches = (
            state_dict["batches"],
            state_dict["epoch"],
            state_dict["epoch_batches"],
        )
        self._resume = dict(state_dict)
        log.info("data position restored: %d batches consumed per rank", self._batches)

    def _resume_plan(self) -> tuple[int, bool] | None:
        """``(batches to skip, go on past an epoch's end)`` for the training loader, while resuming.

        Lightning either continues the epoch the checkpoint was taken in (a checkpoint after a
        batch), or starts the next one (a checkpoint after the epoch ended, as at ``max_steps``).
        Continuing: skip what was consumed and serve the rest of that epoch (maybe nothing). Next
        epoch: a resampled stream skips what was consumed and serves from there, without an empty
        epoch; a stream of epochs (``resampled=false``) starts its next pass.
        """
        if self._resume is None:
            return None
        next_epoch = self.trainer is not None and self.trainer.current_epoch > self._resume["epoch"]
        if self.resampled:
            return self._resume["batches"], next_epoch
        return (0, False) if next_epoch else (self._resume["epoch_batches"], False)

    def _loader(
        self, urls: list[str], num_samples: int, decode: Any, collate: Any, train: bool, bucketed: bool = False
    ) -> DataLoader:
        resampled = self.resampled and train
        workers = self.num_workers if resampled else self._split_workers(len(urls), train)
        epoch_batches = batches_per_worker(num_samples, self.batch_size, world_size(), workers)
        pipeline = shard_stream(
            urls,
            decode,
            self.batch_size,
            collate,
            handler=SkipCounter(self.max_bad_fraction, self.bad_fraction_min_samples),
            shuffle_buffer=self.shuffle_buffer if train else 0,
            resampled=resampled,
            seed=self.seed,
            batches_per_epoch=epoch_batches if resampled else None,
            partial_batches=not train,
            batcher=BucketBatcher(self.batch_size, collate, partial=not train) if bucketed else None,
            samples_per_shard=math.ceil(num_samples / max(1, len(urls))),
            shard_retries=self.shard_retries,
            shard_retry_delay_s=self.shard_retry_delay_s,
        )
        loader = ResumableLoader(
            pipeline,
            batch_size=None,
            num_workers=workers,
            persistent_workers=workers > 0,
            pin_memory=torch.cuda.is_available(),
            generator=torch.Generator().manual_seed(self.seed),  # worker seeds leave the global RNG alone
        )
        if train:
            loader.resume_plan = self._resume_plan
        return loader

    def _split_workers(self, num_shards: int, train: bool) -> int:
        """Loader workers when shards are split between ranks and workers (each needs a shard).

        Raises:
            DataError: training has fewer shards than ranks x workers, or any loader fewer than ranks.
        """
        world = world_size()
        if num_shards < world or (train and num_shards < world * max(1, self.num_workers)):
            raise DataError(
                f"{num_shards} shard(s) for {world} rank(s) x {max(1, self.num_workers)} loader worker(s): every "
                "worker of every rank needs a shard of its own; write more, smaller shards, lower "
                "data.num_workers, or set data.resampled=true"
            )
        return self.num_workers if train else min(self.num_workers, num_shards // world)
