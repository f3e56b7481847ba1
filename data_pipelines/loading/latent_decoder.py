"""A latent-shard sample -> the arrays of one training sample (in loader workers), and their collation into a
batch dict: which batch keys a folder's samples give, from its manifest."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from data_pipelines.latents.format import (
    VARIANTS_META,
    LatentManifest,
    LatentSample,
    decode_latent_sample,
    micro_conditioning,
)
from data_pipelines.loading.variants import CAPTION_VARIANT_KEYS, VARIANTS_SUFFIX
from data_pipelines.raw.format import sample_origin
from data_pipelines.transforms.augment import VariantSettings


class LatentDecoder:
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
        self.text = True  # emit text (and SDXL's pooled); drop_text turns it off

    def drop_text(self) -> None:
        """Emit no ``text`` ``(T, D)`` (nor SDXL's ``pooled`` ``(P,)``, nor their ``_variants``): the training step
        encodes the samples' ``token_ids`` itself (``model.train_text_encoder``), so the precomputed embeddings
        would be batched and moved to the device only to be discarded. The members are still checked."""
        dropped = {*TEXT_BATCH_KEYS, *(f"{key}{VARIANTS_SUFFIX}" for key in TEXT_BATCH_KEYS)}
        self.names = tuple(name for name in self.names if name not in dropped)
        self.text = False

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
        arrays: tuple[np.ndarray, ...] = (latents, decoded.text) if self.text else (latents,)
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
            arrays += (decoded.pooled, time_ids) if self.text else (time_ids,)
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
TEXT_BATCH_KEYS = ("text", "pooled")  # (B, T, D), SDXL's (B, P) float16: the precomputed text (LatentDecoder.drop_text)


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
