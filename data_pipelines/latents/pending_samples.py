"""A raw sample decoded and preprocessed, waiting to be encoded: its pixels at the training resolution (or its
bucket's size), its caption(s), its metadata, and the extra images of its variants and loss mask.

:class:`~data_pipelines.latents.shard_encoder.LatentShardEncoder` makes them (``preprocess``) and encodes them in
batches of one image size (``encode_batch``).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch


@dataclass
class PendingSample:
    """One preprocessed sample (tensor shapes in the comments)."""

    key: str
    pixels: torch.Tensor  # (3, h, w): the resolution, or the sample's bucket size
    caption: str
    meta: dict[str, Any]
    variants: torch.Tensor | None = None  # (V, 3, h, w): the other crops and mirror images (meta["variants"])
    loss_mask: torch.Tensor | None = None  # (1, h, w) in [0, 1], through the image's resize and crop
    loss_mask_variants: torch.Tensor | None = None  # (V, 1, h, w): the loss mask of each of variants
    caption_variants: list[str] | None = None  # the K captions to embed (caption settings active), the first canonical


def canonical_crop_rng(seed: int, key: str) -> np.random.Generator:
    """The generator of sample ``key``'s canonical crop under ``crop="random"``: seeded by ``seed`` and the key
    alone, so a rerun, a resumed run or another rank crops each sample as before. Its own stream, apart from
    the random crop variants' (:meth:`~data_pipelines.transforms.augment.VariantSettings.plan`), which would
    otherwise start with the same corner."""
    digest = hashlib.sha256(f"{seed}:{key}:canonical".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))
