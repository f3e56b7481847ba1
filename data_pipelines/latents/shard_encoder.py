"""Encode raw shards into latent shards with the frozen encoders, one shard at a time.

:class:`LatentShardEncoder` decodes and preprocesses a raw shard's samples (counting corrupt ones) into
:class:`~data_pipelines.latents.pending_samples.PendingSample`, encodes them in batches of one image size, and
:class:`~data_pipelines.latents.shard_output.ShardOutput` writes the result under a temporary name that only a
complete shard loses. ``data_pipelines.latents.precompute`` runs it on every
rank and keeps the cache.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import webdataset as wds
from PIL import Image

from data_pipelines.latents.encoders import FrozenEncoders
from data_pipelines.latents.format import (
    CAPTION_VARIANTS_META,
    CAPTIONS_SETTING,
    MASKS_SETTING,
    TOKEN_IDS_SETTING,
    VARIANTS_META,
    VARIANTS_SETTING,
    CacheKey,
    LatentSample,
    ShardEntry,
)
from data_pipelines.latents.pending_samples import PendingSample, canonical_crop_rng
from data_pipelines.latents.shard_output import ShardOutput
from data_pipelines.raw.captions import sample_captions
from data_pipelines.raw.format import decode_loss_mask, decode_raw_sample
from data_pipelines.shards.corrupt_samples import SkipCounter
from data_pipelines.shards.shard_reading import tar_samples
from data_pipelines.transforms.augment import VariantSettings
from data_pipelines.transforms.buckets import BucketResizeCrop
from data_pipelines.transforms.captions import CaptionSettings, caption_variants
from data_pipelines.transforms.images import ResizeCrop
from data_pipelines.transforms.masks import (
    MaskSettings,
    crop_loss_mask,
    latent_mask,
    loss_mask_for,
    masked_pixels,
    random_mask,
)
from lf_common.errors import ConfigError, DataError

CROP_SEED_SETTING = "crop_seed"
"""In the transform settings (cache key, manifest) of ``crop="random"``: the seed of the canonical crops."""


Transform = ResizeCrop | BucketResizeCrop


class LatentShardEncoder:
    """Encode raw shards into latent shards with frozen encoders.

    Args:
        encoders: the frozen VAE and text encoder.
        transform: preprocessing of each image to the training resolution, or into its
            aspect-ratio bucket (:class:`~data_pipelines.transforms.buckets.BucketResizeCrop`).
        batch_size: images per encoder call (each call encodes images of one size).
        skips: counts corrupt samples (an undecodable image, a missing member) and fails the run
            when too many are bad; default: more than 1% of at least 1,000 samples.
        masks: also store each sample's random inpainting mask and its masked image's latents
            (for training an inpainting UNet; :mod:`data_pipelines.transforms.masks`).
        variants: also store the latents of each sample's mirror image and random crops
            (:mod:`data_pipelines.transforms.augment`); not with ``masks``. Its ``seed`` (``augment_seed``) also
            seeds the canonical crop of ``crop="random"``, with the sample key, so a rerun writes the same shards.
        captions: caption variants and tag tricks (:mod:`data_pipelines.transforms.captions`); with
            ``variants`` K > 1 each sample also stores ``text_variants`` ``(K, T, D)``.
        token_ids: also store each caption's token ids ``(n, L)`` int32 (SDXL: both tokenizers'; with caption
            variants each variant's, ``(K, n, L)``), the ids its text embedding is encoded from, so training can
            run the text encoder (precompute's ``keep_token_ids``).

    Raises:
        ConfigError: both ``masks`` and ``variants`` are set.
    """

    def __init__(
        self,
        encoders: FrozenEncoders,
        transform: Transform,
        batch_size: int = 64,
        skips: SkipCounter | None = None,
        masks: MaskSettings | None = None,
        variants: VariantSettings | None = None,
        captions: CaptionSettings | None = None,
        token_ids: bool = False,
    ) -> None:
        if masks is not None and variants is not None and variants.enabled:
            raise ConfigError("image variants (flip, crops_per_image) have no inpainting masks: not both")
        self.encoders = encoders
        self.transform = transform
        self.batch_size = batch_size
        self.skips = skips or SkipCounter()
        self.masks = masks
        self.variants = variants if variants is not None and variants.enabled else None
        self.augment_seed = variants.seed if variants is not None else 0
        self.captions = captions if captions is not None and captions.active else None
        self.token_ids = token_ids

    def transform_settings(self) -> dict[str, Any]:
        """The preprocessing settings (in the cache key and the manifest), with the mask, variant and caption
        settings if any, and whether the shards hold token ids (absent when not, as in shards written before)."""
        masks = {MASKS_SETTING: self.masks.settings()} if self.masks else {}
        variants = {VARIANTS_SETTING: self.variants.settings()} if self.variants else {}
        captions = {CAPTIONS_SETTING: self.captions.settings()} if self.captions else {}
        transform = self.transform.settings()
        if transform.get("crop") == "random":  # the seed decides every stored crop: another seed, other latents
            transform[CROP_SEED_SETTING] = self.augment_seed
        token_ids = {TOKEN_IDS_SETTING: True} if self.token_ids else {}
        return {**transform, **masks, **variants, **captions, **token_ids}

    def cache_key(self, source_sha256: str) -> CacheKey:
        """The key of a latent shard made from an input shard with this content hash."""
        return CacheKey(
            source_sha256=source_sha256,
            vae=self.encoders.vae_info.fingerprint,
            text_encoder=self.encoders.text_encoder_info.fingerprint,
            tokenizer=self.encoders.tokenizer_fingerprint,
            transforms=self.transform_settings(),
            text_encoder_2=self.encoders.text_encoder_2_info.fingerprint if self.encoders.sdxl else "",
            tokenizer_2=self.encoders.tokenizer_2_fingerprint,
            text_output=self.encoders.text_output,
        )

    def encode_batch(self, batch: list[PendingSample]) -> list[LatentSample]:
        """Encode one batch of preprocessed samples."""
        pixels = torch.stack([p.pixels for p in batch])  # (B, 3, H, W)
        latents = self.encoders.encode_images(pixels)  # (B, C, h, w)
        count = len(batch[0].caption_variants) if batch[0].caption_variants else 1  # K captions per sample
        captions = [c for p in batch for c in (p.caption_variants or [p.caption])]  # (B * K,)
        texts, pooled = self.encoders.encode_text_and_pooled(captions)  # (B * K, T, D), (B * K, P)
        texts = texts.unflatten(0, (len(batch), count))  # (B, K, T, D)
        pooled = pooled.unflatten(0, (len(batch), count)) if pooled is not None else None  # (B, K, P)
        if count > 1:
            text_variants = texts.float().cpu().numpy()
            pooled_variants = pooled.float().cpu().numpy() if pooled is not None else [None] * len(batch)
        texts, pooled = texts[:, 0], pooled[:, 0] if pooled is not None else None  # variant 0: the canonical
        samples = [
            LatentSample(p.key, latent, text, p.caption, p.meta)
            for p, latent, text in zip(batch, latents.float().cpu().numpy(), texts.float().cpu().numpy(), strict=True)
        ]
        if pooled is not None:  # SDXL: the time_ids come from each sample's metadata (format.micro_conditioning)
            for sample, vector in zip(samples, pooled.float().cpu().numpy(), strict=True):
                sample.pooled = vector
        if count > 1:
            for sample, text, vectors in zip(samples, text_variants, pooled_variants, strict=True):
                sample.text_variants, sample.pooled_variants = text, vectors
        if self.token_ids:
            self._add_token_ids(samples, captions, count)
        if self.variants is not None:  # (B, V, 3, H, W) -> (B, V, C, h, w), batch_size images an encoder call
            extra = torch.stack([p.variants for p in batch])  # type: ignore[misc]
            flat = extra.flatten(0, 1)
            encoded = torch.cat([self.encoders.encode_images(chunk) for chunk in flat.split(self.batch_size)])
            encoded = encoded.float().cpu().numpy().reshape(*extra.shape[:2], *encoded.shape[1:])
            for sample, variants in zip(samples, encoded, strict=True):
                sample.latent_variants = variants
        if self.masks is not None:
            height, width = pixels.shape[-2:]
            masks = torch.stack([random_mask(p.key, height, width, self.masks) for p in batch])  # (B, 1, H, W)
            masked = self.encoders.encode_images(masked_pixels(pixels, masks)).float().cpu()  # (B, C, h, w)
            small = latent_mask(masks, tuple(latents.shape[-2:]))  # (B, 1, h, w)
            for sample, mask, masked_latent in zip(samples, small.numpy(), masked.numpy(), strict=True):
                sample.mask, sample.masked_latent = mask, masked_latent
        latent_size = tuple(latents.shape[-2:])
        for sample, pending in zip(samples, batch, strict=True):
            if pending.loss_mask is not None:  # area-averaged to the latent grid: (1, h, w) in [0, 1]
                sample.loss_mask = latent_mask(pending.loss_mask[None], latent_size, "area")[0].numpy()
            if pending.loss_mask_variants is not None:  # (V, 1, h, w)
                sample.loss_mask_variants = latent_mask(pending.loss_mask_variants, latent_size, "area").numpy()
        return samples

    def _add_token_ids(self, samples: list[LatentSample], captions: list[str], count: int) -> None:
        """Give each sample the token ids of the captions just encoded (``captions``: ``B * K``, each sample's
        ``K`` variants in turn): ``token_ids`` ``(n, L)`` (and ``token_ids_2``), with ``K`` > 1 also
        ``token_ids_variants`` ``(K, n, L)``, variant 0 the canonical caption's."""
        per_tokenizer = [ids for ids in self.encoders.token_ids(captions) if ids is not None]  # (B * K, n, L) each
        grouped = [ids.unflatten(0, (len(samples), count)).numpy() for ids in per_tokenizer]  # (B, K, n, L) each
        for index, sample in enumerate(samples):
            sample.token_ids = grouped[0][index, 0]
            sample.token_ids_2 = grouped[1][index, 0] if len(grouped) > 1 else None
            if count > 1:
                sample.token_ids_variants = grouped[0][index]
                sample.token_ids_2_variants = grouped[1][index] if len(grouped) > 1 else None

    def preprocessed_batches(self, source: str) -> Iterator[list[PendingSample]]:
        """Decode and preprocess the samples of raw shard ``source`` into batches of one image size.

        Samples wait in one batch per size (one per bucket, when bucketed; at most
        ``buckets x batch_size`` images held); a batch is yielded when full, the rest at the end of
        the shard, smallest size first. Corrupt samples are skipped and counted by :attr:`skips`. A sample's
        loss mask (``KEY.mask.png``) takes its image's resize and crop.
        """
        batches: dict[tuple[int, ...], list[PendingSample]] = {}
        dataset = wds.DataPipeline(wds.SimpleShardList([source]), functools.partial(tar_samples, handler=self.skips))
        for raw in dataset:
            try:
                sample_key, image, caption, meta = decode_raw_sample(raw)
                mask = decode_loss_mask(raw, image.size)
            except Exception as error:  # CorruptSampleError, or bad JSON metadata
                self.skips(error)
                continue
            variants = None
            if self.captions is not None:
                try:
                    captions = sample_captions(caption, meta, f"{source}: sample {sample_key}")
                except Exception as error:  # CorruptSampleError: a bad caption list in KEY.json
                    self.skips(error)
                    continue
                variants = caption_variants(sample_key, captions, self.captions)
                caption = variants[0]
                if len(variants) > 1:
                    meta = {**meta, CAPTION_VARIANTS_META: variants}
            self.skips.count_good()
            pending = self.preprocess(sample_key, image, caption, meta, mask)
            pending.caption_variants = variants
            batch = batches.setdefault(tuple(pending.pixels.shape), [])
            batch.append(pending)
            if len(batch) == self.batch_size:
                yield list(batch)
                batch.clear()
        for shape in sorted(batches):
            if batches[shape]:
                yield batches[shape]

    def preprocess(
        self, key: str, image: Image.Image, caption: str, meta: dict[str, Any], mask: Image.Image | None = None
    ) -> PendingSample:
        """One sample's image resized and cropped to its canonical variant, and to its other variants when
        :attr:`variants` is set (each with its ``crop_top_left`` and ``flip`` in ``meta["variants"]``); its
        loss ``mask`` (mode L, the image's size), if any, through the same resize, crops and mirrors."""
        resized = self.transform.prepare(image, canonical_crop_rng(self.augment_seed, key))
        pixels, info = resized.canonical_pixels()  # (3, h, w)
        loss_mask = loss_mask_for(mask, info) if mask is not None else None
        pending = PendingSample(key, pixels, caption, {**meta, **info}, loss_mask=loss_mask)
        if self.variants is not None:
            plan = self.variants.plan(key, resized.canonical, resized.image.size[::-1], resized.target)
            rendered = [resized.render(variant) for variant in plan[1:]]  # the canonical one is latent.npy
            pending.variants = torch.stack([variant_pixels for variant_pixels, _ in rendered])  # (V, 3, h, w)
            pending.meta[VARIANTS_META] = [variant_info for _, variant_info in rendered]
            if mask is not None:  # crop_loss_mask takes the corner in the unmirrored resized image, as CropVariant
                size, target = info["original_size"], info["target_size"]
                pending.loss_mask_variants = torch.stack(
                    [crop_loss_mask(mask, size, (v.top, v.left), target, v.flip) for v in plan[1:]]
                )
        return pending

    def encode_shard(self, source: str, target: str | Path, key: CacheKey) -> ShardEntry:
        """Encode every sample of raw shard ``source`` into latent shard ``target`` and record it
        (in this process, without Lightning)."""
        skipped_before = self.skips.skipped
        output = ShardOutput(target, source, key)
        try:
            for batch in self.preprocessed_batches(source):
                output.write(self.encode_batch(batch))
        except BaseException:
            output.abort()
            raise
        return output.finish(self.skips.skipped - skipped_before)

    def latent_shape(self, height: int | None = None, width: int | None = None) -> list[int]:
        """``[C, h, w]`` of one latent of a ``height`` x ``width`` image (default: the resolution square)."""
        height = height or self.transform.resolution
        probe = torch.zeros(1, 3, height, width or height)
        return list(self.encoders.encode_images(probe).shape[1:])

    def bucket_latent_shapes(self) -> list[list[int]]:
        """``[C, h, w]`` of each bucket's latents (empty when not bucketed)."""
        if not isinstance(self.transform, BucketResizeCrop):
            return []
        channels = self.latent_shape()[0]
        factor = 2 ** (len(self.encoders.vae.config.block_out_channels) - 1)  # the VAE's downsampling factor
        for height, width in self.transform.buckets.sizes:
            if height % factor or width % factor:
                raise DataError(
                    f"bucket {height}x{width} is not a multiple of the VAE's factor {factor}; "
                    "use a bucket step that is a multiple of it"
                )
        return [[channels, height // factor, width // factor] for height, width in self.transform.buckets.sizes]

    def text_shape_and_uncond(self) -> tuple[list[int], Any]:
        """``[T, D]`` of one text embedding and the unconditional embedding ``(T, D)``: the empty caption's,
        or zeros for SDXL (its caption dropout and empty negative prompt are zeros)."""
        uncond = self.encoders.encode_captions([""])[0].float().cpu().numpy()
        if self.encoders.sdxl:
            uncond = np.zeros_like(uncond)
        return list(uncond.shape), uncond

    def token_ids_shape_and_uncond(self) -> tuple[list[int], Any, Any]:
        """With :attr:`token_ids`: ``[n, L]`` of a caption's ids and the empty caption's ids ``(n, L)`` of each
        tokenizer (the second ``None`` without SDXL's); else ``([], None, None)``."""
        if not self.token_ids:
            return [], None, None
        ids, ids_2 = self.encoders.token_ids([""])  # (1, n, L) each
        return list(ids.shape[1:]), ids[0].numpy(), ids_2[0].numpy() if ids_2 is not None else None

    def pooled_shape_and_uncond(self) -> tuple[list[int], Any]:
        """SDXL: ``[P]`` of the pooled embedding and its unconditional value, zeros ``(P,)``; else ``([], None)``."""
        _, pooled = self.encoders.encode_text_and_pooled([""])
        if pooled is None:
            return [], None
        return list(pooled.shape[1:]), np.zeros(pooled.shape[1:], dtype=np.float32)
