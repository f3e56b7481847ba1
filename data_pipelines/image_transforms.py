"""Image preprocessing for the VAE: resize, crop and scale to [-1, 1] (PIL and NumPy, no torchvision)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image


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
            size and the crop's top-left corner in the resized image.
        """
        width, height = image.size
        scale = self.resolution / min(width, height)
        new_w, new_h = max(self.resolution, round(width * scale)), max(self.resolution, round(height * scale))
        resample = Image.Resampling[self.interpolation.upper()]
        if (new_w, new_h) != (width, height):
            image = image.resize((new_w, new_h), resample)
        if self.crop == "random":
            rng = rng or np.random.default_rng()
            top = int(rng.integers(0, new_h - self.resolution + 1))
            left = int(rng.integers(0, new_w - self.resolution + 1))
        elif self.crop == "center":
            top, left = (new_h - self.resolution) // 2, (new_w - self.resolution) // 2
        else:
            raise ValueError(f"crop={self.crop!r}: expected 'center' or 'random'")
        image = image.crop((left, top, left + self.resolution, top + self.resolution))
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32).copy()).permute(2, 0, 1)  # (3, R, R)
        pixels = pixels / 127.5 - 1.0
        info = {"original_size": [height, width], "crop_top_left": [top, left], "resolution": self.resolution}
        return pixels, info


def pixels_to_images(pixels: torch.Tensor) -> list[Image.Image]:
    """Decoded pixels ``(B, 3, H, W)`` in [-1, 1] to PIL RGB images."""
    array = ((pixels.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return [Image.fromarray(a.permute(1, 2, 0).cpu().numpy()) for a in array]
