"""Masks at latent resolution: random inpainting masks, and the loss masks that come with images.

Loss masks (masked loss): a grayscale mask per image (raw shards' ``KEY.mask.png``) follows its image through
the same resize and crop (:func:`crop_loss_mask`, a function of the crop box and a flip, so a crop or flip
variant of the image gets its own mask) and is area-averaged to the latent grid (:func:`latent_mask`), as
kohya-ss/sd-scripts' ``apply_masked_loss`` does (``interpolate(..., mode="area")``).

Random inpainting masks for training an inpainting UNet, one fixed mask per sample.

Stable Diffusion's inpainting models were fine-tuned on synthetic masks, with the whole image
masked in 25% of the samples (the ``sd-v1-5-inpainting`` model card; Rombach et al. 2022). Here a
mask is one to three rectangles, or (with probability ``full_fraction``) the whole image; it is
drawn from a generator seeded by the sample key and ``seed``, so precompute stores it once
(``KEY.mask.npy``) with the masked image's latents, and training needs no VAE.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from data_pipelines.transforms.images import resized_size


@dataclass(frozen=True)
class MaskSettings:
    """How masks are drawn (part of the latent shards' cache key).

    Attributes:
        seed: mixed with each sample key.
        full_fraction: probability of masking the whole image.
        max_boxes: rectangles per mask (1 to this many).
        min_side, max_side: a rectangle's sides as fractions of the image's.
    """

    seed: int = 0
    full_fraction: float = 0.25
    max_boxes: int = 3
    min_side: float = 0.2
    max_side: float = 0.7

    def settings(self) -> dict[str, Any]:
        return asdict(self)


def _generator(key: str, seed: int) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


def random_mask(key: str, height: int, width: int, settings: MaskSettings) -> torch.Tensor:
    """The mask of sample ``key``: ``(1, height, width)`` float, 1 where the model paints, 0 where it keeps."""
    generator = _generator(key, settings.seed)
    mask = torch.zeros(1, height, width)
    if torch.rand((), generator=generator) < settings.full_fraction:
        return mask.fill_(1.0)
    boxes = int(torch.randint(1, settings.max_boxes + 1, (), generator=generator))
    for _ in range(boxes):
        sides = settings.min_side + (settings.max_side - settings.min_side) * torch.rand(2, generator=generator)
        h, w = max(1, int(sides[0] * height)), max(1, int(sides[1] * width))
        top = int(torch.randint(0, height - h + 1, (), generator=generator))
        left = int(torch.randint(0, width - w + 1, (), generator=generator))
        mask[:, top : top + h, left : left + w] = 1.0
    return mask


def masked_pixels(pixels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The image the inpainting UNet sees: ``pixels`` ``(B, 3, H, W)`` in [-1, 1] with the masked part set to 0
    (mid grey), as diffusers' ``StableDiffusionInpaintPipeline`` does (``image * (mask < 0.5)``).

    ``mask``: ``(B, 1, H, W)``, 1 where the model paints."""
    return pixels * (mask < 0.5)


def latent_mask(mask: torch.Tensor, latent_size: tuple[int, int], mode: str = "nearest") -> torch.Tensor:
    """A pixel mask ``(B, 1, H, W)`` at the latent grid ``(B, 1, h, w)``.

    Args:
        mode: ``"nearest"`` for inpainting masks (as diffusers' inpainting pipeline does); ``"area"`` for loss
            masks: each latent pixel takes the mean of the pixels it covers (exact when ``H/h`` and ``W/w`` are
            integers, as the VAE's factor makes them), so the values stay in [0, 1] and a half-covered latent
            pixel weighs half.
    """
    return torch.nn.functional.interpolate(mask, size=latent_size, mode=mode)


def crop_loss_mask(
    mask: Image.Image,
    original_size: tuple[int, int],
    crop_top_left: tuple[int, int],
    target_size: tuple[int, int],
    flip: bool = False,
) -> torch.Tensor:
    """A loss mask through the resize and crop its image took (as in :func:`~.images.resize_and_crop`).

    The mask is resized (bilinear, antialiased when shrinking: values stay in [0, 1]) to the size the image was
    resized to, the same ``target_size`` box is cut at ``crop_top_left``, and, with ``flip``, mirrored left to
    right (a horizontally flipped variant of the image).

    Args:
        mask: mode L, the original image's size.
        original_size: ``[H, W]`` of the original image (``KEY.json``'s ``original_size``).
        crop_top_left: ``[top, left]`` of the crop in the resized image.
        target_size: ``[h, w]`` of the crop (the resolution square, or the bucket's size).
        flip: mirror the cropped mask.

    Returns:
        ``(1, h, w)`` float32 in [0, 1] (1: the loss counts).
    """
    (height, width), (top, left) = target_size, crop_top_left
    new_h, new_w = resized_size(original_size[0], original_size[1], height, width)
    if mask.size != (new_w, new_h):
        mask = mask.resize((new_w, new_h), Image.Resampling.BILINEAR)
    mask = mask.crop((left, top, left + width, top + height))
    if flip:
        mask = mask.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return torch.from_numpy(np.asarray(mask, dtype=np.float32) / 255.0)[None]  # (1, h, w)


def loss_mask_for(mask: Image.Image, info: dict[str, Any], flip: bool = False) -> torch.Tensor:
    """:func:`crop_loss_mask` with the crop a transform reported in ``info`` (``original_size``,
    ``crop_top_left``, ``target_size``: what ``ResizeCrop`` and ``BucketResizeCrop`` return); ``(1, h, w)``."""
    return crop_loss_mask(mask, info["original_size"], info["crop_top_left"], info["target_size"], flip)
