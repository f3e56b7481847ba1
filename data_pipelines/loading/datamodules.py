"""The LightningDataModules that stream shards with webdataset, by the names the configs' ``_target_`` give.

* :class:`LatentShardDataModule` (``data=latents``, :mod:`.latent_shards`) streams precomputed latent shards
  for UNet training.
* :class:`ImageShardDataModule` (``data=images``, :mod:`.image_shards`) streams raw image shards for
  autoencoder training.

Both build on :class:`~data_pipelines.loading.streaming_module.StreamingDataModule`: shards split (or
resampled) per rank and worker, shuffled through a buffer, corrupt samples skipped and counted, dict batches,
and a stream position that resumes exactly. A latent sample's arrays and batch keys are
:mod:`data_pipelines.loading.latent_decoder`'s.
"""

from __future__ import annotations

from data_pipelines.loading.image_shards import ImageShardDataModule, collate_pixels
from data_pipelines.loading.latent_decoder import (
    INPAINTING_BATCH_KEYS,
    LOSS_MASK_BATCH_KEY,
    SDXL_BATCH_KEYS,
    TOKEN_IDS_BATCH_KEYS,
    LatentCollate,
    LatentDecoder,
    collate_latents,
)
from data_pipelines.loading.latent_shards import LatentShardDataModule, uncond_token_ids

__all__ = [
    "INPAINTING_BATCH_KEYS",
    "LOSS_MASK_BATCH_KEY",
    "SDXL_BATCH_KEYS",
    "TOKEN_IDS_BATCH_KEYS",
    "ImageShardDataModule",
    "LatentCollate",
    "LatentDecoder",
    "LatentShardDataModule",
    "collate_latents",
    "collate_pixels",
    "uncond_token_ids",
]
