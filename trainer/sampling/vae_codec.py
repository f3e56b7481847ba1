"""The VAE at sampling time: latents to images, in the dtype the VAE asks for.

SDXL's VAE overflows in float16 (its activations exceed float16's range and decode to NaN/black); its
config says so with ``force_upcast: true``, and diffusers' SDXL pipelines then decode (and encode init
images) in float32 while the rest runs in float16. A VAE fixed for float16 (``force_upcast: false``,
e.g. madebyollin's sdxl-vae-fp16-fix) runs as it is. bfloat16 has float32's range and is never upcast.
As in diffusers, SD 1.x/2.x VAEs are not upcast (their pipelines ignore the flag).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from diffusers import AutoencoderKL
from PIL import Image

from data_pipelines.transforms.images import pixels_to_images


def codec_dtype(vae: AutoencoderKL, sdxl: bool) -> torch.dtype:
    """The dtype ``vae`` encodes and decodes in: float32 for an SDXL VAE held in float16 whose config sets
    ``force_upcast`` (true when absent, as diffusers' default), else the VAE's own dtype."""
    if sdxl and vae.dtype == torch.float16 and vae.config.get("force_upcast", True):
        return torch.float32
    return vae.dtype


@contextmanager
def vae_in(vae: AutoencoderKL, dtype: torch.dtype) -> Iterator[AutoencoderKL]:
    """``vae`` cast to ``dtype`` inside the block and back after it (float16 -> float32 -> float16 is exact)."""
    held = vae.dtype
    if dtype == held:
        yield vae
        return
    vae.to(dtype)
    try:
        yield vae
    finally:
        vae.to(held)


@torch.no_grad()
def decode_latents(vae: AutoencoderKL, latents: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Scaled latents ``(B, C, h, w)`` -> pixels ``(B, 3, H, W)`` in [-1, 1], decoded in ``dtype``."""
    with vae_in(vae, dtype):
        return vae.decode(latents.to(dtype) / vae.config.scaling_factor).sample  # (B, 3, H, W)


def decode_images(vae: AutoencoderKL, latents: torch.Tensor, dtype: torch.dtype) -> list[Image.Image]:
    """Scaled latents ``(B, C, h, w)`` -> RGB images, decoded in ``dtype`` (:func:`decode_latents`)."""
    return pixels_to_images(decode_latents(vae, latents, dtype))
