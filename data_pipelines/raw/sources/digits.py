"""scikit-learn's handwritten digits (1,797 real 8x8 scans) as a captioned image source.

Each digit is scaled from its 0-16 ink values to 0-255, upscaled to ``size`` x ``size`` with
bilinear filtering, stored as an RGB PNG and captioned "a handwritten digit seven". The held-out
split is fixed: every ``HELDOUT_EVERY``-th sample (index 0, 5, 10, ...) is held out, the rest
are ``train``.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from typing import Literal

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits

from data_pipelines.raw.sources.base import SourceItem
from lf_common.errors import ConfigError

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
HELDOUT_EVERY = 5
Split = Literal["train", "heldout", "all"]


def digit_caption(label: int) -> str:
    """The demo's caption for a digit label, e.g. ``"a handwritten digit seven"``."""
    return f"a handwritten digit {DIGIT_WORDS[label]}"


def digits_split(split: Split) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The digits of one split.

    Returns:
        ``(images, labels, indices)``: images ``(N, 8, 8)`` float in [0, 16], labels ``(N,)``,
        and each sample's index in ``load_digits()``.
    """
    digits = load_digits()
    indices = np.arange(len(digits.target))
    if split == "train":
        indices = indices[indices % HELDOUT_EVERY != 0]
    elif split == "heldout":
        indices = indices[indices % HELDOUT_EVERY == 0]
    elif split != "all":
        raise ConfigError(f"digits split {split!r}: expected 'train', 'heldout' or 'all'")
    return digits.images[indices], digits.target[indices], indices


def digit_to_image(digit: np.ndarray, size: int) -> Image.Image:
    """An ``(8, 8)`` digit in [0, 16] as a ``size`` x ``size`` RGB image (ink is bright)."""
    gray = Image.fromarray(np.clip(digit * (255.0 / 16.0), 0, 255).astype(np.uint8), mode="L")
    return gray.resize((size, size), Image.Resampling.BILINEAR).convert("RGB")


def image_to_digit(image: Image.Image) -> np.ndarray:
    """The inverse view: an RGB image of any size as an ``(8, 8)`` array in [0, 16] (area average)."""
    gray = image.convert("L").resize((8, 8), Image.Resampling.BOX)
    return np.asarray(gray, dtype=np.float64) * (16.0 / 255.0)


class DigitsSource:
    """The digits of one split as captioned PNGs.

    Args:
        split: ``"train"``, ``"heldout"`` or ``"all"``.
        size: image side in pixels.
        limit: only the first ``limit`` digits of the split (all when ``None``).
    """

    def __init__(self, split: Split = "train", size: int = 32, limit: int | None = None) -> None:
        self.split = split
        self.size = size
        self.limit = limit

    def __len__(self) -> int:
        total = len(digits_split(self.split)[1])
        return total if self.limit is None else min(self.limit, total)

    def __iter__(self) -> Iterator[SourceItem]:
        images, labels, indices = digits_split(self.split)
        count = len(labels) if self.limit is None else self.limit
        for digit, label, index in zip(images[:count], labels[:count], indices[:count], strict=True):
            buffer = io.BytesIO()
            digit_to_image(digit, self.size).save(buffer, format="PNG")
            yield SourceItem(
                origin=f"digits[{index}]",
                image_bytes=buffer.getvalue(),
                caption=digit_caption(int(label)),
                meta={"source": "sklearn.datasets.load_digits", "index": int(index), "label": int(label)},
            )
