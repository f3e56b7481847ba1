"""Image preprocessing for the VAE: resize, crop and scale to [-1, 1] (PIL and NumPy, no torchvision)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image

from lf_common.errors import ConfigError


@dataclass(frozen=True)
class ResizeCrop:
    """Resize the shorter side to ``resolution`` and crop a ``resolution`` square.

    Attributes:
        resolution: output side in pixels.
        crop: ``"center"`` or ``"random"`` (the crop offset is returned, so it can be stored).
        interpolation: PIL resampling filter name (``"bicubic"``, ``"bilinear"``, ``"lanczos"``).
    """

    resolution: int
    crop: Literal["center", "random"] = "center"
    interpolation: str = "bicubic"

    def settings(self) -> dict[str, Any]:
        """The settings, for manifests and cache keys."""
        return {"name": "resize_crop", **asdict(self)}

    def __call__(
        self, image: Image.Image, rng: np.random.Generator | None = None
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        """Preprocess one RGB image.

        Returns:
            ``(pixels, info)``: pixels ``(3, R, R)`` float32 in [-1, 1]; info holds the original
            size ``[H, W]``, the crop's top-left corner in the resized image and the target size
            ``[R, R]`` (SDXL's micro-conditioning, see :func:`data_pipelines.latents.format.micro_conditioning`).
        """
        width, height = image.size
        image, top, left = resize_and_crop(image, self.resolution, self.resolution, self.crop, self.interpolation, rng)
        pixels = image_to_pixels(image)  # (3, R, R)
        info = {
            "original_size": [height, width],
            "crop_top_left": [top, left],
            "target_size": [self.resolution, self.resolution],
            "resolution": self.resolution,
        }
        return pixels, info


def resize_and_crop(
    image: Image.Image,
    height: int,
    width: int,
    crop: str = "center",
    interpolation: str = "bicubic",
    rng: np.random.Generator | None = None,
) -> tuple[Image.Image, int, int]:
    """Resize ``image`` (keeping its aspect) to the smallest size that covers ``height`` x ``width``,
    then crop that size out of it.

    Returns:
        ``(image, top, left)``: the ``width`` x ``height`` crop and its top-left corner in the resized image.
    """
    original_w, original_h = image.size
    new_h, new_w = resized_size(original_h, original_w, height, width)
    if (new_w, new_h) != (original_w, original_h):
        image = image.resize((new_w, new_h), Image.Resampling[interpolation.upper()])
    if crop == "random":
        rng = rng or np.random.default_rng()
        top, left = int(rng.integers(0, new_h - height + 1)), int(rng.integers(0, new_w - width + 1))
    elif crop == "center":
        top, left = (new_h - height) // 2, (new_w - width) // 2
    else:
        raise ConfigError(f"crop={crop!r}: expected 'center' or 'random'")
    return image.crop((left, top, left + width, top + height)), top, left


def resized_size(original_h: int, original_w: int, height: int, width: int) -> tuple[int, int]:
    """``(height, width)`` that :func:`resize_and_crop` resizes an ``original_h`` x ``original_w`` image to
    before cropping ``height`` x ``width`` out of it (the smallest size of the same aspect covering it)."""
    scale = max(width / original_w, height / original_h)
    return max(height, round(original_h * scale)), max(width, round(original_w * scale))


def image_to_pixels(image: Image.Image) -> torch.Tensor:
    """An RGB image as pixels ``(3, H, W)`` float32 in [-1, 1]."""
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32).copy()).permute(2, 0, 1)  # (3, H, W)
    return pixels / 127.5 - 1.0


def pixels_to_images(pixels: torch.Tensor) -> list[Image.Image]:
    """Decoded pixels ``(B, 3, H, W)`` in [-1, 1] to PIL RGB images."""
    array = ((pixels.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return [Image.fromarray(a.permute(1, 2, 0).cpu().numpy()) for a in array]
