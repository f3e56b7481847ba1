"""Per-step image augmentation for training without a latent cache (PIL only, no torchvision).

Each call draws from the NumPy generator it is given, so a loader worker's stream of augmentations is a
function of its seed.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageEnhance

from lf_common.errors import ConfigError


@dataclass(frozen=True)
class Augment:
    """Random horizontal flip and a small colour jitter of an RGB image.

    Attributes:
        random_flip: mirror the image left-right with probability 1/2 (off for text, digits or anything
            whose meaning has a handedness).
        color_jitter: strength ``s`` in ``[0, 0.5]``: brightness, contrast and saturation are each scaled by a
            factor drawn from ``U[1 - s, 1 + s]`` (PIL's ``ImageEnhance``, in that order; torchvision's
            ``ColorJitter`` without hue). 0: off; 0.05-0.1 keeps colours recognisable (kohya's ``color_aug``
            shifts hue by up to 8/180 or gamma by 5%, a third of the time).
    """

    random_flip: bool = False
    color_jitter: float = 0.0

    def __post_init__(self) -> None:
        if not 0 <= self.color_jitter <= 0.5:
            raise ConfigError(f"data.color_jitter={self.color_jitter}: expected 0 (off) to 0.5; 0.05-0.1 is typical")

    @property
    def active(self) -> bool:
        """Whether any augmentation is on."""
        return self.random_flip or self.color_jitter > 0

    def settings(self) -> dict[str, Any]:
        """The settings, for the in-memory manifest."""
        return {"name": "augment", **asdict(self)}

    def __call__(self, image: Image.Image, rng: np.random.Generator) -> Image.Image:
        """The augmented image (the same object when nothing is drawn to change it)."""
        if self.random_flip and rng.random() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if self.color_jitter > 0:
            low, high = 1 - self.color_jitter, 1 + self.color_jitter
            for enhancer in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
                image = enhancer(image).enhance(float(rng.uniform(low, high)))
        return image
