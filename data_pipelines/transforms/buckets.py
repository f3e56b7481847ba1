"""Aspect-ratio bucketing: encode each image at the size, of a fixed set, nearest its aspect ratio,
and batch samples of one size together.

Training at one square resolution crops away the sides of every wide or tall photo (and teaches the
model to draw cut-off subjects). Bucketing, as NovelAI described it for their SD fine-tune (NovelAI,
"NovelAI Improvements on Stable Diffusion", 2022) and kohya, SimpleTuner and MosaicML implement it,
keeps a set of sizes of about equal pixel count (so every batch costs about the same), gives each
image the bucket whose aspect ratio is nearest its own, resizes it to cover that size and
center-crops the rest. The loader then draws every batch from one bucket.

All sizes here are ``(height, width)`` in pixels, like tensor shapes and ``original_size`` in ``KEY.json``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from data_pipelines.transforms.images import CropVariant, ResizedImage, crop_corner, resize_to_cover
from lf_common.errors import ConfigError


@dataclass(frozen=True)
class BucketSet:
    """A fixed set of training sizes.

    Attributes:
        sizes: ``(height, width)`` pixel sizes, sorted from the tallest to the widest.
    """

    sizes: tuple[tuple[int, int], ...]

    def __init__(self, sizes: Iterable[Sequence[int]]) -> None:
        pairs = sorted({(int(h), int(w)) for h, w in sizes}, key=lambda hw: (hw[1] / hw[0], hw[0]))
        if not pairs:
            raise ConfigError("a bucket set needs at least one (height, width) size")
        if any(h <= 0 or w <= 0 for h, w in pairs):
            raise ConfigError(f"bucket sizes must be positive: {pairs}")
        object.__setattr__(self, "sizes", tuple(pairs))

    @property
    def resolution(self) -> int:
        """The side of a square with the largest bucket's pixel count (the set's nominal resolution)."""
        return round(math.sqrt(max(h * w for h, w in self.sizes)))

    def nearest(self, height: int, width: int) -> int:
        """Index of the bucket whose aspect ratio is nearest (in log ratio) an image's ``height`` x ``width``."""
        ratio = math.log(width / height)
        return min(range(len(self.sizes)), key=lambda i: abs(math.log(self.sizes[i][1] / self.sizes[i][0]) - ratio))

    def to_list(self) -> list[list[int]]:
        """``[[height, width], ...]`` for manifests and cache keys."""
        return [list(size) for size in self.sizes]


def generate_buckets(base_resolution: int = 512, step: int = 64, max_ratio: float = 2.0) -> BucketSet:
    """Buckets of at most ``base_resolution**2`` pixels with sides that are multiples of ``step``.

    For each width ``w = base_resolution, base_resolution - step, ...`` the height is the largest
    multiple of ``step`` with ``w * h <= base_resolution**2``; the pair and its transpose are kept
    while ``h / w <= max_ratio``. With 512/64/2.0: 512x512, 576x448, 640x384 and their transposes.

    Args:
        base_resolution: the square bucket's side; every bucket has about its pixel count.
        step: sides are multiples of this (a multiple of the VAE factor times the UNet's
            downsampling, e.g. 64 for SD: 8 x 8).
        max_ratio: the longest side is at most this many times the shortest.
    """
    if base_resolution % step:
        raise ConfigError(f"base_resolution={base_resolution} is not a multiple of step={step}")
    if max_ratio < 1:
        raise ConfigError(f"max_ratio={max_ratio}: expected at least 1")
    area = base_resolution * base_resolution
    sizes = []
    for width in range(base_resolution, 0, -step):
        height = area // width // step * step
        if height / width > max_ratio:
            break
        sizes += [(height, width), (width, height)]
    return BucketSet(sizes)


@dataclass(frozen=True)
class BucketResizeCrop:
    """Resize each image to cover its bucket's size and center-crop it to that size.

    Same interface as :class:`~data_pipelines.transforms.images.ResizeCrop`; its ``info`` adds the
    bucket's index and ``target_size``, and its settings (in the cache key) the whole bucket set.

    Attributes:
        buckets: the bucket set.
        interpolation: PIL resampling filter name.
    """

    buckets: BucketSet
    interpolation: str = "bicubic"

    @property
    def resolution(self) -> int:
        """The bucket set's nominal resolution."""
        return self.buckets.resolution

    def settings(self) -> dict[str, Any]:
        """The settings, for manifests and cache keys (another bucket set makes cached latents stale)."""
        return {
            "name": "bucket_resize_crop",
            "buckets": self.buckets.to_list(),
            "crop": "center",
            "interpolation": self.interpolation,
            "resolution": self.resolution,
        }

    def __call__(
        self, image: Image.Image, rng: np.random.Generator | None = None
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        """Preprocess one RGB image into its bucket.

        Returns:
            ``(pixels, info)``: pixels ``(3, h, w)`` float32 in [-1, 1] at the bucket's size; info
            holds ``original_size`` ``[H, W]``, ``crop_top_left`` in the resized image, ``bucket``
            (index into the manifest's ``bucket_sizes``) and ``target_size`` ``[h, w]``.
        """
        return self.prepare(image).canonical_pixels()

    def prepare(self, image: Image.Image, rng: np.random.Generator | None = None) -> ResizedImage:
        """Resize one RGB image to cover its bucket's size and choose its center crop (not applied yet)."""
        width, height = image.size
        index = self.buckets.nearest(height, width)
        target_h, target_w = self.buckets.sizes[index]
        resized = resize_to_cover(image, target_h, target_w, self.interpolation)
        top, left = crop_corner(resized.size, target_h, target_w, "center")
        info = {"original_size": [height, width], "bucket": index, "target_size": [target_h, target_w]}
        return ResizedImage(resized, (target_h, target_w), CropVariant(top, left), info)


class BucketBatcher:
    """A webdataset pipeline stage: decoded samples in, batches of samples of one shape out.

    Samples are grouped by the shape of their first element (the latent ``(C, h, w)``); a bucket's
    batch is emitted as soon as it holds ``batch_size`` samples. At most
    ``buckets x (batch_size - 1) + 1`` samples are held at a time. When the stream ends, the
    incomplete batches are emitted (one shape each) if ``partial`` is set, else dropped.

    Args:
        batch_size: samples per batch.
        collate: list of samples (all of one shape) -> batch.
        partial: emit the incomplete batches at the end of the stream.
    """

    def __init__(self, batch_size: int, collate: Callable[[list[Any]], Any], partial: bool = False) -> None:
        self.batch_size = batch_size
        self.collate = collate
        self.partial = partial

    def __call__(self, samples: Iterable[Any]) -> Iterator[Any]:
        buffers: dict[tuple[int, ...], list[Any]] = {}
        for sample in samples:
            shape = tuple(np.shape(sample[0]))
            buffer = buffers.setdefault(shape, [])
            buffer.append(sample)
            if len(buffer) == self.batch_size:
                yield self.collate(buffer)
                buffers[shape] = []
        if self.partial:
            for shape in sorted(buffers):
                if buffers[shape]:
                    yield self.collate(buffers[shape])
