"""Image feature extractors for FID and KID: what one is, and images -> features in batches.

An extractor is an ``nn.Module`` that maps uint8 RGB images ``(B, 3, H, W)`` to features
``(B, D)``, has ``num_features`` (``D``, which torchmetrics reads) and a ``fingerprint()``: a
SHA-256 over everything its output depends on (weights and settings), so cached reference
features are reused only with the same extractor (:mod:`trainer.evaluation.reference`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from itertools import islice
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn


class FeatureExtractor(nn.Module):
    """Base class: uint8 images ``(B, 3, H, W)`` -> float features ``(B, num_features)``.

    Attributes:
        num_features: the feature size ``D``.
    """

    num_features: int

    def fingerprint(self) -> str:
        """SHA-256 (hex) of what the features depend on; the default hashes the class, the
        parameters and buffers, and :meth:`settings`."""
        return tensors_fingerprint(type(self).__name__, self.state_dict(), self.settings())

    def settings(self) -> dict[str, Any]:
        """Settings (besides the weights) that change the features, for the fingerprint."""
        return {}


def tensors_fingerprint(name: str, tensors: dict[str, torch.Tensor], settings: dict[str, Any]) -> str:
    """SHA-256 over a name, named tensors (names, dtypes, shapes, values) and JSON settings."""
    digest = hashlib.sha256(name.encode())
    digest.update(json.dumps(settings, sort_keys=True).encode())
    for key in sorted(tensors):
        tensor = tensors[key].detach().cpu()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
        tensor = tensor.reshape(-1).contiguous()
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def images_to_tensor(images: list[Image.Image]) -> torch.Tensor:
    """Equally sized PIL images -> uint8 ``(B, 3, H, W)``."""
    arrays = [np.asarray(image.convert("RGB"), dtype=np.uint8) for image in images]
    sizes = {a.shape for a in arrays}
    if len(sizes) > 1:
        raise ValueError(f"images of different sizes {sorted(sizes)}: resize them to one size first")
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()  # (B, 3, H, W)


def tensor_to_images(images: torch.Tensor) -> list[Image.Image]:
    """uint8 ``(B, 3, H, W)`` -> PIL RGB images."""
    return [Image.fromarray(a) for a in images.permute(0, 2, 3, 1).cpu().numpy()]


def _batches(images: Iterable[Image.Image], size: int) -> Iterator[list[Image.Image]]:
    iterator = iter(images)
    while batch := list(islice(iterator, size)):
        yield batch


@torch.no_grad()
def extract_features(
    extractor: FeatureExtractor, images: Iterable[Image.Image], batch_size: int = 64, num: int | None = None
) -> torch.Tensor:
    """Features ``(N, D)`` float64 (on the extractor's device) of ``images``, ``batch_size`` at a time.

    Args:
        num: the number of images when known (``(0, D)`` needs no image to know ``D``).
    """
    device = next((t.device for t in [*extractor.parameters(), *extractor.buffers()]), torch.device("cpu"))
    chunks = [extractor(images_to_tensor(batch).to(device)).to(torch.float64) for batch in _batches(images, batch_size)]
    if not chunks:
        return torch.zeros(num or 0, extractor.num_features, dtype=torch.float64, device=device)
    return torch.cat(chunks)  # (N, D)
