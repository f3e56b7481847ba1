"""``data=latents``: the data module that streams the latent shards lf-precompute wrote."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from data_pipelines.latents.format import (
    LatentManifest,
    load_uncond_embedding,
    load_uncond_pooled,
    load_uncond_token_ids,
)
from data_pipelines.loading.latent_decoder import LatentCollate, LatentDecoder
from data_pipelines.loading.streaming_module import StreamingDataModule
from lf_common.errors import ConfigError


class LatentShardDataModule(StreamingDataModule):
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
        skip_text: batch no ``text`` (nor SDXL's ``pooled``): the training step encodes ``token_ids`` itself
            (``model.train_text_encoder``, which the config's ``data.skip_text`` follows); needs shards with token
            ids (``lf-precompute keep_token_ids=true``), training and validation.

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
        skip_text: bool = False,
        **loader: Any,
    ) -> None:
        super().__init__(**loader)
        self.random_flip = random_flip
        self.use_crop_variants = use_crop_variants
        self.skip_text = skip_text
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
        for folder, manifest in ((train_dir, self.manifest), (val_dir, self.val_manifest)):
            if skip_text and manifest is not None and not manifest.token_ids:
                raise ConfigError(SKIP_TEXT_WITHOUT_IDS.format(folder=folder))

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

    def decoder(self, manifest: LatentManifest, train: bool) -> LatentDecoder:
        """The decode step of a loader: training draws the stored variants as set, validation takes the first;
        without the text with ``skip_text``."""
        decoder = LatentDecoder(manifest, self.random_flip and train, self.use_crop_variants and train)
        if self.skip_text:
            decoder.drop_text()
        return decoder

    def train_dataloader(self) -> DataLoader:
        return self._loader(
            self.train_urls,
            self.epoch_samples,
            (decoder := self.decoder(self.manifest, train=True)),
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
            (decoder := self.decoder(self.val_manifest, train=False)),
            LatentCollate(decoder.names),
            train=False,
            bucketed=bool(self.val_manifest.bucket_sizes),
        )


SKIP_TEXT_WITHOUT_IDS = (
    "data.skip_text=true (model.train_text_encoder=true: the step encodes the token ids), but the latent shards in "
    "{folder} hold no token ids: precompute them with lf-precompute keep_token_ids=true"
)


def uncond_token_ids(folder: str, manifest: LatentManifest) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The empty caption's token ids ``(n, L)`` int64 of a latent folder and SDXL's second ones (``None`` where
    the folder holds none)."""
    ids, ids_2 = load_uncond_token_ids(folder, manifest)  # int32 (n, L) each, or None
    return (
        torch.from_numpy(ids.astype(np.int64)) if ids is not None else None,
        torch.from_numpy(ids_2.astype(np.int64)) if ids_2 is not None else None,
    )
