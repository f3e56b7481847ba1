"""Cached image augmentation: which crops and mirror images of a sample precompute encodes and stores.

Peers augment per step (diffusers' ``--random_flip``/``--center_crop``, kohya's ``flip_aug``/``random_crop``),
which means running the VAE in every step. Here precompute stores a fixed set of variants per sample
(``KEY.latent_variants.npy``, :mod:`data_pipelines.latents.format`) and training draws one per step
(:mod:`data_pipelines.loading.variants`). The variants of a sample are, in this order::

    canonical crop, [its mirror image], random crop 1, [its mirror image], ..., random crop N, [its mirror]

The canonical crop is the transform's own (center, or the bucket's); it is ``KEY.latent.npy``, variant 0.
The random crops are drawn inside the image resized to cover the target size (the resolution square, or
the sample's bucket), from a generator seeded by the sample key and ``seed`` (as
:mod:`data_pipelines.transforms.masks` draws inpainting masks), so a rerun writes the same shards. The
order depends on the settings only, so the loader knows which stored index is a mirror image or a
random crop without reading a sample (:meth:`VariantSettings.selection`).
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np

from data_pipelines.transforms.images import CropVariant
from lf_common.errors import ConfigError


@dataclass(frozen=True)
class VariantSettings:
    """Which variants precompute stores per sample (part of the latent shards' cache key).

    Attributes:
        flip: also store each crop's mirror image.
        crops_per_image: random crops stored besides the canonical one.
        seed: mixed with each sample key to draw its crops.
    """

    flip: bool = False
    crops_per_image: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.crops_per_image < 0:
            raise ConfigError(f"crops_per_image={self.crops_per_image}: expected 0 or more")

    @property
    def count(self) -> int:
        """Variants per sample, the canonical one included."""
        return (1 + self.crops_per_image) * (2 if self.flip else 1)

    @property
    def enabled(self) -> bool:
        """Whether any variant besides the canonical one is stored."""
        return self.count > 1

    def settings(self) -> dict[str, Any]:
        """The settings, for manifests and cache keys."""
        return asdict(self)

    @classmethod
    def from_settings(cls, settings: dict[str, Any] | None) -> VariantSettings:
        """Settings as :meth:`settings` wrote them (``None``: shards without variants)."""
        return cls(**settings) if settings else cls()

    def kinds(self) -> list[tuple[bool, bool]]:
        """``(random crop, mirrored)`` of each variant index, canonical first."""
        return [(crop > 0, flip) for crop in range(1 + self.crops_per_image) for flip in (False, True)[: 1 + self.flip]]

    def selection(self, random_flip: bool = True, use_crops: bool = True) -> list[int]:
        """The variant indices training draws from: all, less the mirror images unless ``random_flip``,
        less the random crops unless ``use_crops``. Always starts with 0, the canonical variant."""
        return [
            index
            for index, (crop, flip) in enumerate(self.kinds())
            if (random_flip or not flip) and (use_crops or not crop)
        ]

    def plan(self, key: str, canonical: CropVariant, resized_size: tuple[int, int], target: tuple[int, int]) -> list:
        """Every variant of sample ``key``, canonical first (see the module's order).

        Args:
            key: the sample key (seeds its crops with :attr:`seed`).
            canonical: the transform's own crop.
            resized_size: ``(height, width)`` of the resized image the crops are taken from.
            target: ``(height, width)`` of a crop.

        Returns:
            :attr:`count` :class:`CropVariant` s.
        """
        digest = hashlib.sha256(f"{self.seed}:{key}".encode()).digest()
        rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
        (resized_h, resized_w), (height, width) = resized_size, target
        crops = [canonical] + [
            CropVariant(int(rng.integers(0, resized_h - height + 1)), int(rng.integers(0, resized_w - width + 1)))
            for _ in range(self.crops_per_image)
        ]
        return [replace(crop, flip=flip) for crop in crops for flip in (False, True)[: 1 + self.flip]]
