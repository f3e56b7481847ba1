"""Random inpainting masks for training an inpainting UNet, one fixed mask per sample.

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

import torch


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


def latent_mask(mask: torch.Tensor, latent_size: tuple[int, int]) -> torch.Tensor:
    """A pixel mask ``(B, 1, H, W)`` at the latent grid ``(B, 1, h, w)`` (nearest, as diffusers' inpainting
    pipeline does)."""
    return torch.nn.functional.interpolate(mask, size=latent_size)
