"""LightningDataModules that stream shards with webdataset.

* :class:`LatentShardDataModule` streams precomputed latent shards for UNet training.
* :class:`ImageShardDataModule` streams raw image shards for autoencoder training.

Both split shards (or resample them) per rank and worker, shuffle through a buffer, skip and
count corrupt samples, and yield dict batches.
"""

from __future__ import annotations

import logging
import math
import os
import tarfile
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader

from data_pipelines.latents.format import (
    VARIANTS_META,
    LatentManifest,
    LatentSample,
    decode_latent_sample,
    load_uncond_embedding,
    load_uncond_pooled,
    load_uncond_token_ids,
    micro_conditioning,
)
from data_pipelines.loading.variants import CAPTION_VARIANT_KEYS, VARIANTS_SUFFIX, draw_variants, variant_generator
from data_pipelines.raw.format import decode_raw_sample, sample_origin
from data_pipelines.shards.corrupt_samples import SampleCounts, SkipCounter, take_counts
from data_pipelines.shards.listing import resolve_shards
from data_pipelines.shards.resumable_loader import ResumableLoader
from data_pipelines.shards.shard_reading import open_shard
from data_pipelines.shards.streaming import batches_per_worker, shard_stream
from data_pipelines.transforms.augment import VariantSettings
from data_pipelines.transforms.buckets import BucketBatcher
from data_pipelines.transforms.images import ResizeCrop
from lf_common.errors import DataError

log = logging.getLogger(__name__)


def _rank() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return int(os.environ.get("RANK", "0"))


def _world_size() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


class _StreamingDataModule(L.LightningDataModule):
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
            draw = variant_generator(self.seed, _rank(), self._batches) if training else None
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
            "world_size": _world_size(),
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
        epoch_batches = batches_per_worker(num_samples, self.batch_size, _world_size(), workers)
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
        world = _world_size()
        if num_shards < world or (train and num_shards < world * max(1, self.num_workers)):
            raise DataError(
                f"{num_shards} shard(s) for {world} rank(s) x {max(1, self.num_workers)} loader worker(s): every "
                "worker of every rank needs a shard of its own; write more, smaller shards, lower "
                "data.num_workers, or set data.resampled=true"
            )
        return self.num_workers if train else min(self.num_workers, num_shards // world)


class _LatentDecoder:
    """Picklable decode step for latent samples (runs in loader workers): a tuple of arrays, named by
    :attr:`names` (the batch keys :class:`LatentCollate` gives them). When the manifest counts loss masks,
    every sample gets a ``loss_mask`` ``(1, h, w)``: its own, or ones (unmasked) for a sample without one.
    Shards with caption variants give ``text_variants`` ``(K, T, D)`` (and ``pooled_variants`` ``(K, P)``)
    instead of ``text`` (and ``pooled``): the data module keeps one per sample, as for image variants.

    From shards with image variants (precompute's ``flip``/``crops_per_image``) it emits ``latents_variants``
    ``(V, C, h, w)`` (and, for SDXL, ``time_ids_variants`` ``(V, 6)``, each variant's crop) in place of
    ``latents`` (and ``time_ids``), canonical first, holding the variants :meth:`VariantSettings.selection`
    keeps; the data module draws one per sample and step (:mod:`data_pipelines.loading.variants`).

    From shards with token ids (precompute's ``keep_token_ids``) it also emits ``token_ids`` ``(n, L)`` int64
    (SDXL: and ``token_ids_2``), the ids ``text`` was encoded from; with caption variants ``token_ids_variants``
    ``(K, n, L)``, drawn with the same index as ``text_variants``.

    Args:
        manifest: the shards' manifest.
        random_flip: keep the stored mirror images among the variants.
        use_crop_variants: keep the stored random crops among the variants.
    """

    def __init__(self, manifest: LatentManifest, random_flip: bool = True, use_crop_variants: bool = True) -> None:
        self.latent_shapes = manifest.latent_shapes()
        self.text_shape = tuple(manifest.text_shape)
        self.inpainting = manifest.inpainting
        self.pooled_shape = tuple(manifest.pooled_shape) if manifest.sdxl else None
        settings = VariantSettings.from_settings(manifest.variant_settings)
        self.stored_variants = settings.count - 1  # in latent_variants.npy, besides latent.npy
        self.selection = settings.selection(random_flip, use_crop_variants)  # indices, 0: latent.npy
        suffix = VARIANTS_SUFFIX if len(self.selection) > 1 else ""
        self.loss_masks = manifest.loss_masks > 0
        self._suffix = suffix
        self.names = (
            "latents" + suffix,
            "text",
            *(INPAINTING_BATCH_KEYS if self.inpainting else ()),
            *((SDXL_BATCH_KEYS[0], SDXL_BATCH_KEYS[1] + suffix) if manifest.sdxl else ()),
            *(TOKEN_IDS_BATCH_KEYS[: 2 if manifest.sdxl else 1] if manifest.token_ids else ()),
            *((LOSS_MASK_BATCH_KEY + suffix,) if self.loss_masks else ()),  # last: emit_loss_masks appends it
        )
        self.token_ids_shape = tuple(manifest.token_ids_shape) if manifest.token_ids else None
        self.caption_variants = manifest.caption_variants
        if self.caption_variants > 1:  # the caption side as NAME_variants
            self.names = tuple(f"{n}{VARIANTS_SUFFIX}" if n in CAPTION_VARIANT_KEYS else n for n in self.names)

    def __call__(self, sample: dict[str, Any]) -> tuple[np.ndarray, ...]:
        variants = len(self.selection) > 1
        decoded = decode_latent_sample(
            sample,
            text_shape=self.text_shape,
            latent_shapes=self.latent_shapes,
            inpainting=self.inpainting,
            pooled_shape=self.pooled_shape,
            latent_variants=self.stored_variants if variants else 0,
            loss_masks=self.loss_masks,
            caption_variants=self.caption_variants,
            token_ids_shape=self.token_ids_shape,
        )
        if self.caption_variants > 1:
            decoded.text, decoded.pooled = decoded.text_variants, decoded.pooled_variants
            decoded.token_ids, decoded.token_ids_2 = decoded.token_ids_variants, decoded.token_ids_2_variants
        latents = decoded.latent
        if variants:
            stored = [decoded.latent, *decoded.latent_variants]  # type: ignore[misc]
            latents = np.stack([stored[index] for index in self.selection])  # (V, C, h, w)
        arrays: tuple[np.ndarray, ...] = (latents, decoded.text)
        if self.inpainting:
            arrays += (decoded.mask, decoded.masked_latent)
        if self.pooled_shape is not None:
            origin = sample_origin(sample)
            time_ids = micro_conditioning(decoded.meta, origin)  # (6,)
            if variants:
                crops = [{}, *decoded.meta[VARIANTS_META]]  # the canonical crop is the sample's own
                time_ids = np.stack(
                    [micro_conditioning({**decoded.meta, **crops[index]}, origin) for index in self.selection]
                )  # (V, 6)
            arrays += (decoded.pooled, time_ids)
        if self.token_ids_shape is not None:  # int32 on disk, int64 (an embedding's index dtype) in the batch
            arrays += tuple(ids.astype(np.int64) for ids in (decoded.token_ids, decoded.token_ids_2) if ids is not None)
        if self.loss_masks:
            arrays += (self._loss_mask(decoded, variants),)
        return arrays

    def emit_loss_masks(self) -> None:
        """Give every sample a ``loss_mask`` (ones where none is stored), though these shards hold none: e.g.
        beside another dataset of a mixed run that has masks (batches need the same keys)."""
        if not self.loss_masks:
            self.loss_masks = True
            self.names = (*self.names, LOSS_MASK_BATCH_KEY + self._suffix)

    def _loss_mask(self, decoded: LatentSample, variants: bool) -> np.ndarray:
        """The sample's loss mask ``(1, h, w)`` (``(V, 1, h, w)``, one per selected variant, with ``variants``);
        ones (unmasked) for a sample without one."""
        if decoded.loss_mask is None:
            ones = np.ones((1, *decoded.latent.shape[1:]), dtype=decoded.latent.dtype)
            return np.stack([ones] * len(self.selection)) if variants else ones
        if not variants:
            return decoded.loss_mask
        stored = [decoded.loss_mask, *decoded.loss_mask_variants]  # type: ignore[misc]
        return np.stack([stored[index] for index in self.selection])


INPAINTING_BATCH_KEYS = ("mask", "masked_latents")
SDXL_BATCH_KEYS = ("pooled", "time_ids")  # (B, P) float16 and (B, 6) int64: SDXL's added conditioning
LOSS_MASK_BATCH_KEY = "loss_mask"  # (B, 1, h, w) float16 in [0, 1]: masked loss (ones for unmasked samples)
TOKEN_IDS_BATCH_KEYS = ("token_ids", "token_ids_2")  # (B, n, L) int64 each: the captions' ids (SDXL: both)


class LatentCollate:
    """Stack decoded samples into a batch dict: ``latents`` ``(B, C, h, w)`` and ``text`` ``(B, T, D)``
    float16; from inpainting shards also ``mask`` ``(B, 1, h, w)`` and ``masked_latents`` ``(B, C, h, w)``;
    from SDXL shards also ``pooled`` ``(B, P)`` float16 and ``time_ids`` ``(B, 6)`` int64; from shards with loss
    masks also ``loss_mask`` ``(B, 1, h, w)`` float16 in [0, 1]; from shards with token ids also ``token_ids``
    ``(B, n, L)`` int64 (SDXL: and ``token_ids_2``).
    Bucketed data arrives in batches of one bucket (see :class:`~data_pipelines.transforms.buckets.BucketBatcher`),
    so ``(h, w)`` is the same within a batch and may differ between batches.

    Args:
        names: the batch key of each element of a decoded sample, in order.
    """

    def __init__(self, names: tuple[str, ...]) -> None:
        self.names = names

    def __call__(self, samples: list[tuple[np.ndarray, ...]]) -> dict[str, torch.Tensor]:
        columns = list(zip(*samples, strict=True))
        return {name: torch.from_numpy(np.stack(column)) for name, column in zip(self.names, columns, strict=True)}


def collate_latents(samples: list[tuple[np.ndarray, ...]]) -> dict[str, torch.Tensor]:
    """:class:`LatentCollate` of plain (``latents``, ``text``) or inpainting samples (two more arrays)."""
    return LatentCollate(("latents", "text", *INPAINTING_BATCH_KEYS)[: len(samples[0])])(samples)


class LatentShardDataModule(_StreamingDataModule):
    """Streams latent shards written by precompute.

    When the shards are bucketed (the manifest lists ``bucket_sizes``), every batch holds samples
    of one bucket, so batches differ in ``(h, w)``.

    Args:
        train_dir: a precompute output folder (with ``manifest.json``).
        val_dir: an optional second folder for validation loss.
        batch_size: samples per batch on each rank.
        num_workers: loader worker processes per rank.
        shuffle_buffer: shuffle buffer in samples.
        resampled: draw training shards with replacement (equal batches on every rank).
        seed: shard and shuffle seed.
        max_bad_fraction: the run fails when more than this fraction of the samples a loader
            process reads are corrupt (see :class:`~data_pipelines.shards.corrupt_samples.SkipCounter`).
        bad_fraction_min_samples: the fraction is taken over at least this many samples.
        shard_retries: further tries of a shard that cannot be opened before it is skipped (and
            counted as its samples within ``max_bad_fraction``).
        shard_retry_delay_s: the wait before the first retry (doubling after).
        epoch_samples: the samples an epoch of the resampled training stream covers (default: the
            manifest's count); e.g. to give two streams that are paired batch by batch epochs of
            one length.
        random_flip: draw the mirror images precompute stored (``flip=true``), one variant per sample
            and step; off for data a mirror changes (text, digits).
        use_crop_variants: draw the random crops precompute stored (``crops_per_image``).

    Attributes:
        uncond_text: the empty caption's embedding ``(T, D)`` float32 (caption dropout, guidance).
        uncond_pooled: SDXL's unconditional pooled embedding ``(P,)`` float32, else ``None``.
        uncond_token_ids: the empty caption's token ids ``(n, L)`` int64, ``None`` when the shards hold no ids.
        uncond_token_ids_2: SDXL's second tokenizer's ``(n, L)`` int64, else ``None``.
    """

    def __init__(
        self,
        train_dir: str,
        val_dir: str | None = None,
        epoch_samples: int | None = None,
        random_flip: bool = True,
        use_crop_variants: bool = True,
        **loader: Any,
    ) -> None:
        super().__init__(**loader)
        self.random_flip = random_flip
        self.use_crop_variants = use_crop_variants
        self.train_dir = train_dir
        self.val_dir = val_dir
        self.manifest = LatentManifest.load(train_dir)
        self.manifest.check_consistent(train_dir)
        self.train_urls = self.manifest.shard_paths(train_dir)
        self.uncond_text = torch.from_numpy(load_uncond_embedding(train_dir, self.manifest).astype(np.float32))
        pooled = load_uncond_pooled(train_dir, self.manifest)  # SDXL's zeros (P,); None otherwise
        self.uncond_pooled = torch.from_numpy(pooled.astype(np.float32)) if pooled is not None else None
        self.uncond_token_ids, self.uncond_token_ids_2 = uncond_token_ids(train_dir, self.manifest)
        self.val_manifest = LatentManifest.load(val_dir) if val_dir else None
        self.epoch_samples = epoch_samples or self.manifest.num_samples

    draw_settings = (("random_flip", True), ("use_crop_variants", True))

    def state_dict(self) -> dict[str, Any]:
        """The stream position, its settings, and which stored image variants the stream draws."""
        return {**super().state_dict(), "random_flip": self.random_flip, "use_crop_variants": self.use_crop_variants}

    @property
    def loss_masks(self) -> bool:
        """Whether training batches carry ``loss_mask`` (the training shards hold loss masks)."""
        return self.manifest.loss_masks > 0

    @property
    def token_ids(self) -> bool:
        """Whether training batches carry ``token_ids`` (the training shards hold token ids)."""
        return self.manifest.token_ids

    def train_dataloader(self) -> DataLoader:
        return self._loader(
            self.train_urls,
            self.epoch_samples,
            (decoder := _LatentDecoder(self.manifest, self.random_flip, self.use_crop_variants)),
            LatentCollate(decoder.names),
            train=True,
            bucketed=bool(self.manifest.bucket_sizes),
        )

    def val_dataloader(self) -> DataLoader | list:
        if self.val_manifest is None:
            return []
        urls = self.val_manifest.shard_paths(self.val_dir)
        return self._loader(
            urls,
            self.val_manifest.num_samples,
            (decoder := _LatentDecoder(self.val_manifest, random_flip=False, use_crop_variants=False)),
            LatentCollate(decoder.names),
            train=False,
            bucketed=bool(self.val_manifest.bucket_sizes),
        )


def uncond_token_ids(folder: str, manifest: LatentManifest) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The empty caption's token ids ``(n, L)`` int64 of a latent folder and SDXL's second ones (``None`` where
    the folder holds none)."""
    ids, ids_2 = load_uncond_token_ids(folder, manifest)  # int32 (n, L) each, or None
    return (
        torch.from_numpy(ids.astype(np.int64)) if ids is not None else None,
        torch.from_numpy(ids_2.astype(np.int64)) if ids_2 is not None else None,
    )


class _ImageDecoder:
    """Picklable decode step for raw image samples."""

    def __init__(self, transform: ResizeCrop) -> None:
        self.transform = transform

    def __call__(self, sample: dict[str, Any]) -> torch.Tensor:
        _, image, _, _ = decode_raw_sample(sample)
        pixels, _ = self.transform(image)
        return pixels


def collate_pixels(samples: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Stack images: ``pixels`` ``(B, 3, R, R)`` float32 in [-1, 1]."""
    return {"pixels": torch.stack(samples)}


class ImageShardDataModule(_StreamingDataModule):
    """Streams raw image shards, preprocessed to a square resolution, for autoencoder training.

    Args:
        shards: raw shards (a folder, glob, brace pattern or list).
        resolution: training resolution.
        crop: ``"center"`` or ``"random"``.
        val_shards: optional held-out raw shards for validation.
        **loader: batch_size, num_workers, shuffle_buffer, resampled, seed, max_bad_fraction,
            bad_fraction_min_samples.
    """

    def __init__(
        self, shards: Any, resolution: int, crop: str = "random", val_shards: Any = None, **loader: Any
    ) -> None:
        super().__init__(**loader)
        self.urls = resolve_shards(shards)
        self.val_urls = resolve_shards(val_shards) if val_shards else None
        self.transform = ResizeCrop(resolution, crop=crop)
        self.num_samples = _count_samples(self.urls)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.urls, self.num_samples, _ImageDecoder(self.transform), collate_pixels, train=True)

    def val_dataloader(self) -> DataLoader | list:
        if not self.val_urls:
            return []
        center = ResizeCrop(self.transform.resolution, crop="center")
        return self._loader(self.val_urls, _count_samples(self.val_urls), _ImageDecoder(center), collate_pixels, False)


def _count_samples(urls: list[str]) -> int:
    """Samples in raw shards: the distinct keys of their members (webdataset's key rule); local files or
    object-store URLs, read as streams."""
    total = 0
    for url in urls:
        with open_shard(url) as stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
            total += len({Path(member.name).name.split(".", 1)[0] for member in tar})
    return total
