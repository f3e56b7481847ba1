"""Training without a latent cache: raw image shards, augmented per step, encoded on the training device.

For small datasets (tens to thousands of images), where paying the frozen encoders every step costs less
than running ``lf-precompute`` and where each step should see a fresh crop, flip, colour jitter or caption.
:class:`OnlineImageDataModule` streams raw shards (the layout ``lf-shards`` and img2dataset write) and, in
Lightning's ``on_after_batch_transfer`` hook (on the training device, before the training step), turns each
batch of pixels and captions into the batch a latent shard would have given: ``latents`` ``(B, C, h, w)``,
``text`` ``(B, T, D)`` and ``token_ids`` ``(B, n, L)`` (as shards precomputed with ``keep_token_ids``), by the
very encoders ``lf-precompute`` runs (:class:`~data_pipelines.latents.encoders.FrozenEncoders`). So the
LatentDiffusion module, its loss, caption dropout, EMA, checkpoints and export are the cached path's, and
the encoders are no part of the model: DDP, DeepSpeed and FSDP never wrap, shard or checkpoint them.

The data module also holds what a latent folder's manifest says (which VAE, text encoder and tokenizer), in
memory, so checkpoints record them and ``lf-export`` and the validation-image callbacks find them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, get_worker_info

from data_pipelines.latents.encoders import FrozenEncoders
from data_pipelines.latents.format import LatentManifest
from data_pipelines.loading.ranks import rank
from data_pipelines.loading.streaming_module import StreamingDataModule
from data_pipelines.raw.format import decode_raw_sample
from data_pipelines.shards.listing import resolve_shards
from data_pipelines.shards.shard_reading import count_samples
from data_pipelines.transforms.captions import StepCaptionTricks
from data_pipelines.transforms.images import ResizeCrop
from data_pipelines.transforms.step_augment import Augment
from lf_common.errors import ConfigError

log = logging.getLogger(__name__)

CaptionTransform = Callable[[str, np.random.Generator], str]
"""A per-step caption transform ``(caption, rng) -> caption`` (e.g. tag shuffling after ``keep_tokens``, tag
dropout: :mod:`data_pipelines.transforms.captions`), run in the loader workers on training captions only."""


class _OnlineDecoder:
    """Picklable decode-and-augment step (runs in loader workers): ``(pixels (3, R, R) in [-1, 1], caption)``.

    Each worker draws its augmentations from its own generator, seeded by ``seed``, the worker's torch seed
    (itself from the loader's seeded generator) and the rank.
    """

    def __init__(
        self, transform: ResizeCrop, augment: Augment | None, caption_transform: CaptionTransform | None, seed: int
    ) -> None:
        self.transform = transform
        self.augment = augment
        self.caption_transform = caption_transform
        self.seed = seed
        self._rng: np.random.Generator | None = None

    @property
    def rng(self) -> np.random.Generator:
        if self._rng is None:
            worker = get_worker_info()
            self._rng = np.random.default_rng([self.seed, worker.seed if worker else 0, rank()])
        return self._rng

    def __call__(self, sample: dict[str, Any]) -> tuple[torch.Tensor, str]:
        _, image, caption, _ = decode_raw_sample(sample)
        if self.augment is not None and self.augment.active:
            image = self.augment(image, self.rng)
        pixels, _ = self.transform(image, self.rng)  # (3, R, R); a random crop draws its offset here
        if self.caption_transform is not None:
            caption = self.caption_transform(caption, self.rng)
        return pixels, caption


def collate_pixels_and_captions(samples: list[tuple[torch.Tensor, str]]) -> dict[str, Any]:
    """``pixels`` ``(B, 3, R, R)`` float32 in [-1, 1] and ``captions`` (a list of ``B`` strings)."""
    pixels, captions = zip(*samples, strict=True)
    return {"pixels": torch.stack(pixels), "captions": list(captions)}


class OnlineImageDataModule(StreamingDataModule):
    """Streams raw image shards with per-step augmentation; the frozen VAE and text encoder encode each batch
    on the training device (``on_after_batch_transfer``), so the module receives ``latents`` and ``text``.

    Args:
        shards: raw shards (a folder, glob, brace pattern or list; ``s3://`` too).
        encoders: the frozen VAE, text encoder and tokenizer (as ``lf-precompute`` loads them; built on the CPU,
            moved to the training device at the first batch). SD 1.x/2.x-style: SDXL's second encoder and its
            size/crop conditioning are not encoded here (precompute SDXL data).
        resolution: the training resolution (square).
        crop: ``"random"`` (a fresh crop of the resized image every step) or ``"center"``.
        random_flip: mirror half the images left-right, drawn every step.
        color_jitter: brightness/contrast/saturation jitter strength
            (:class:`~data_pipelines.transforms.step_augment.Augment`).
        caption_transform: optional per-step caption transform ``(caption, rng) -> caption`` (training only).
        captions: kohya-style tag tricks drawn every step (``shuffle_tags``, ``keep_tokens``,
            ``keep_tokens_separator``, ``tag_dropout``, ``prefix``, ``separator``: precompute's ``captions:`` keys,
            :class:`~data_pipelines.transforms.captions.StepCaptionTricks`); not with ``caption_transform``.
        val_shards: optional held-out raw shards for ``val/loss`` (center crop, no augmentation).
        pretrained: the folder ``encoders`` were loaded from (the config's one key for them; not read here).
        skip_text: encode no ``text``: the training step encodes the batch's ``token_ids`` with the encoder it
            trains (``model.train_text_encoder``, which the config's ``data.skip_text`` follows), so the frozen text
            encoder stays on the CPU (it still gives the empty caption's embedding).
        **loader: batch_size, num_workers, shuffle_buffer, resampled, seed, max_bad_fraction, bad_fraction_min_samples,
            shard_retries, shard_retry_delay_s (as :class:`~data_pipelines.loading.datamodules.LatentShardDataModule`).

    Attributes:
        token_ids: ``True``: batches carry ``token_ids`` ``(B, n, L)`` int64, the ids ``text`` is encoded from.
        uncond_text: the empty caption's embedding ``(T, D)`` float32 (caption dropout).
        uncond_token_ids: the empty caption's ids ``(n, L)`` int64; ``uncond_token_ids_2`` is ``None`` (no SDXL).
    """

    def __init__(
        self,
        shards: Any,
        encoders: FrozenEncoders,
        resolution: int,
        crop: str = "random",
        random_flip: bool = False,
        color_jitter: float = 0.0,
        caption_transform: CaptionTransform | None = None,
        captions: dict[str, Any] | None = None,
        val_shards: Any = None,
        pretrained: str | None = None,
        skip_text: bool = False,
        **loader: Any,
    ) -> None:
        super().__init__(**loader)
        self.skip_text = skip_text
        if encoders.sdxl:
            raise ConfigError(
                "data=images_online encodes with one text encoder (SD 1.x/2.x); an SDXL folder needs pooled text and "
                "size/crop conditioning: precompute it (lf-precompute) and train with data=latents"
            )
        self.urls = resolve_shards(shards)
        self.val_urls = resolve_shards(val_shards) if val_shards else None
        self.encoders = encoders
        self.transform = ResizeCrop(resolution, crop=crop)
        self.augment = Augment(random_flip=random_flip, color_jitter=color_jitter)
        if captions and caption_transform is not None:
            raise ConfigError("data.captions and data.caption_transform both given: the tag tricks are one transform")
        self.caption_transform = StepCaptionTricks(**captions) if captions else caption_transform
        self.num_samples = count_samples(self.urls)
        uncond = encoders.encode_captions([""])[0].float().cpu()  # (T, D): the empty caption, for caption dropout
        self.uncond_text = uncond
        self.token_ids = True
        self.uncond_token_ids = encoders.token_ids([""])[0][0]  # (n, L) int64
        self.uncond_token_ids_2 = None
        self.manifest = self._manifest(list(uncond.shape))

    def _manifest(self, text_shape: list[int]) -> LatentManifest:
        """What a latent folder's manifest would say of this data (no shards): the encoders export packs."""
        probe = torch.zeros(1, 3, self.transform.resolution, self.transform.resolution)
        latent_shape = list(self.encoders.encode_images(probe).shape[1:])
        transforms = {**self.transform.settings(), "online": self.augment.settings()}
        return LatentManifest(
            resolution=self.transform.resolution,
            latent_shape=latent_shape,
            text_shape=text_shape,
            vae=self.encoders.vae_info,
            text_encoder=self.encoders.text_encoder_info,
            tokenizer_path=self.encoders.tokenizer_path,
            transforms=transforms,
        )

    def train_dataloader(self) -> DataLoader:
        decoder = _OnlineDecoder(self.transform, self.augment, self.caption_transform, self.seed)
        return self._loader(self.urls, self.num_samples, decoder, collate_pixels_and_captions, train=True)

    def val_dataloader(self) -> DataLoader | list:
        if not self.val_urls:
            return []
        decoder = _OnlineDecoder(ResizeCrop(self.transform.resolution, crop="center"), None, None, self.seed)
        return self._loader(
            self.val_urls, count_samples(self.val_urls), decoder, collate_pixels_and_captions, train=False
        )

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Encode the batch on its device: ``pixels`` and ``captions`` become ``latents`` ``(B, C, h, w)`` and
        ``text`` ``(B, T, D)`` (no gradient; none with ``skip_text``), as a latent shard's batch, with the captions'
        ``token_ids`` ``(B, n, L)`` int64 (the ids ``text`` is encoded from: the same ``chunked_token_ids``)."""
        if not (isinstance(batch, dict) and "pixels" in batch):
            return batch
        pixels = batch.pop("pixels")
        encoders = self._encoders_on(pixels.device)
        captions = batch.pop("captions")
        batch["latents"] = encoders.encode_images(pixels)
        if not self.skip_text:
            batch["text"] = encoders.encode_captions(captions)
        batch["token_ids"] = encoders.token_ids(captions)[0].to(pixels.device)
        return batch

    def _encoders_on(self, device: torch.device) -> FrozenEncoders:
        """The encoders, moved to ``device`` the first time a batch arrives there (the text encoder only when it
        encodes the batches: not with ``skip_text``)."""
        if self.encoders.device != device:
            self.encoders.vae.to(device)
            if not self.skip_text:
                self.encoders.text_encoder.to(device)
        return self.encoders
