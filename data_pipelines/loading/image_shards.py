"""``data=images``: the data module that streams raw image shards, preprocessed to a square, for autoencoder
training."""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import DataLoader

from data_pipelines.loading.streaming_module import StreamingDataModule
from data_pipelines.raw.format import decode_raw_sample
from data_pipelines.shards.listing import resolve_shards
from data_pipelines.shards.shard_reading import count_samples
from data_pipelines.transforms.images import ResizeCrop


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


class ImageShardDataModule(StreamingDataModule):
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
        self.num_samples = count_samples(self.urls)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.urls, self.num_samples, _ImageDecoder(self.transform), collate_pixels, train=True)

    def val_dataloader(self) -> DataLoader | list:
        if not self.val_urls:
            return []
        center = ResizeCrop(self.transform.resolution, crop="center")
        return self._loader(self.val_urls, count_samples(self.val_urls), _ImageDecoder(center), collate_pixels, False)
