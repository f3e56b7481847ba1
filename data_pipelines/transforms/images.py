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
        return self.prepare(image, rng).canonical_pixels()

    def prepare(self, image: Image.Image, rng: np.random.Generator | None = None) -> ResizedImage:
        """Resize one RGB image to cover the resolution square and choose its crop (not applied yet)."""
        width, height = image.size
        resized = resize_to_cover(image, self.resolution, self.resolution, self.interpolation)
        top, left = crop_corner(resized.size, self.resolution, self.resolution, self.crop, rng)
        info = {"original_size": [height, width], "target_size": [self.resolution, self.resolution]}
        return ResizedImage(
            resized, (self.resolution, self.resolution), CropVariant(top, left), {**info, "resolution": self.resolution}
        )


@dataclass
class ResizedImage:
    """An image resized to cover its target size, with its canonical crop chosen (a transform's ``prepare``).

    Attributes:
        image: the resized image (at least ``target`` in both sides).
        target: ``(height, width)`` of a crop.
        canonical: the transform's own crop (variant 0).
        info: the sample's preprocessing metadata, all but the crop's (``original_size``, ``target_size``, ...).
    """

    image: Image.Image
    target: tuple[int, int]
    canonical: CropVariant
    info: dict[str, Any]

    def render(self, variant: CropVariant) -> tuple[torch.Tensor, dict[str, Any]]:
        """:func:`render_variant` of this image."""
        return render_variant(self.image, variant, *self.target)

    def canonical_pixels(self) -> tuple[torch.Tensor, dict[str, Any]]:
        """``(pixels, info)`` of the canonical crop: pixels ``(3, h, w)``; info with its ``crop_top_left``."""
        pixels, crop = self.render(self.canonical)
        return pixels, {**self.info, "crop_top_left": crop["crop_top_left"]}


@dataclass(frozen=True)
class CropVariant:
    """One stored version of a sample's image: a crop of the resized image, maybe mirrored.

    Attributes:
        top, left: the crop's corner in the resized (unmirrored) image.
        flip: mirror the crop left to right.
    """

    top: int
    left: int
    flip: bool = False

    def apply(self, resized: Image.Image, height: int, width: int) -> Image.Image:
        """The ``height`` x ``width`` crop of ``resized`` at this corner, mirrored when :attr:`flip`.

        Any image of the resized size takes the same crop and mirror (an RGB image, a mask in mode ``L``)."""
        crop = resized.crop((self.left, self.top, self.left + width, self.top + height))
        return crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if self.flip else crop

    def crop_top_left(self, resized_width: int, width: int) -> list[int]:
        """SDXL's ``crop_top_left`` ``[top, left]`` of this variant: the crop's corner in the image the model
        sees, i.e. in the mirrored resized image when :attr:`flip` (diffusers' SDXL training flips, then crops)."""
        return [self.top, resized_width - width - self.left if self.flip else self.left]


def render_variant(
    resized: Image.Image, variant: CropVariant, height: int, width: int
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Every per-image input of one variant of a sample, from the image resized to cover ``height`` x ``width``.

    The one place a variant's crop and mirror are applied: what else is stored per image and variant
    (a loss mask resized like the image) takes the same :meth:`CropVariant.apply`.

    Returns:
        ``(pixels, info)``: pixels ``(3, height, width)`` float32 in [-1, 1] (the VAE's input); info holds
        ``crop_top_left`` (SDXL's micro-conditioning of this variant) and ``flip``.
    """
    pixels = image_to_pixels(variant.apply(resized, height, width))  # (3, height, width)
    return pixels, {"crop_top_left": variant.crop_top_left(resized.size[0], width), "flip": variant.flip}


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
    image = resize_to_cover(image, height, width, interpolation)
    top, left = crop_corner(image.size, height, width, crop, rng)
    return image.crop((left, top, left + width, top + height)), top, left


def resize_to_cover(image: Image.Image, height: int, width: int, interpolation: str = "bicubic") -> Image.Image:
    """``image`` resized (keeping its aspect) to the smallest size that covers ``height`` x ``width``."""
    original_w, original_h = image.size
    new_h, new_w = resized_size(original_h, original_w, height, width)
    if (new_w, new_h) != (original_w, original_h):
        image = image.resize((new_w, new_h), Image.Resampling[interpolation.upper()])
    return image


def crop_corner(
    size: tuple[int, int], height: int, width: int, crop: str = "center", rng: np.random.Generator | None = None
) -> tuple[int, int]:
    """``(top, left)`` of a ``height`` x ``width`` crop of an image of ``size`` ``(W, H)`` (PIL's order):
    centered, or drawn from ``rng`` for ``crop="random"``."""
    new_w, new_h = size
    if crop == "random":
        rng = rng or np.random.default_rng()
        return int(rng.integers(0, new_h - height + 1)), int(rng.integers(0, new_w - width + 1))
    if crop == "center":
        return (new_h - height) // 2, (new_w - width) // 2
    raise ConfigError(f"crop={crop!r}: expected 'center' or 'random'")


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
