"""img2img's and inpainting's inputs: the init image's latents, the mask, the partial schedule (SDEdit).

Shared by every model type (SD 1.x/2.x and SDXL alike): the randomness follows diffusers' img2img and
inpainting pipelines, image ``i`` drawing from its own generator first the VAE posterior sample of
the init image, then the starting noise, then (inpainting) the masked image's posterior sample.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, SchedulerMixin
from PIL import Image

from data_pipelines.transforms.images import image_to_pixels, resize_and_crop
from data_pipelines.transforms.masks import masked_pixels
from lf_common.errors import ConfigError
from trainer.sampling.schedulers import begin_at


def check_strength(strength: float) -> None:
    """Raise ``ConfigError`` unless ``0 < strength <= 1``."""
    if not 0.0 < strength <= 1.0:
        raise ConfigError(f"strength={strength}: expected 0 < strength <= 1")


def partial_schedule(scheduler: SchedulerMixin, steps: int, strength: float) -> torch.Tensor:
    """The last ``int(steps * strength)`` (at least 1) timesteps, the scheduler set to begin there (SDEdit,
    Meng et al. 2022), as diffusers' ``get_timesteps``."""
    run_steps = max(1, min(steps, int(steps * strength)))
    begin = (steps - run_steps) * scheduler.order
    begin_at(scheduler, begin)
    return scheduler.timesteps[begin:]


def image_pixels(image: Image.Image, size: tuple[int, int]) -> torch.Tensor:
    """``image`` resized (keeping its aspect) and center-cropped to ``size`` ``(H, W)`` -> ``(3, H, W)`` in [-1, 1]."""
    height, width = size
    resized, _, _ = resize_and_crop(image.convert("RGB"), height, width, crop="center")
    return image_to_pixels(resized)


@torch.no_grad()
def posterior_samples(vae: AutoencoderKL, pixels: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
    """Scaled latents ``(B, C, h, w)`` of ``pixels`` ``(1, 3, H, W)``: one VAE posterior sample per generator,
    drawn as diffusers' ``retrieve_latents(..., generator)`` does; in the VAE's dtype (see
    :func:`trainer.sampling.vae_codec.vae_in` for an upcast one)."""
    posterior = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist
    samples = []
    for generator in generators:
        eps = torch.randn(posterior.mean.shape, generator=generator).to(posterior.mean)
        samples.append(posterior.mean + posterior.std * eps)  # (1, C, h, w)
    return torch.cat(samples) * vae.config.scaling_factor


@torch.no_grad()
def masked_image_latents(vae: AutoencoderKL, pixels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Latents ``(B, C, h, w)`` of ``pixels`` ``(B, 3, H, W)`` with the part under ``mask`` ``(B, 1, H, W)``
    grey, the VAE posterior's mode (as precompute stores them for training)."""
    masked = masked_pixels(pixels, mask).to(vae.device, vae.dtype)
    return vae.encode(masked).latent_dist.mode() * vae.config.scaling_factor


def full_mask_conditioning(
    vae: AutoencoderKL, batch: int, latent_size: tuple[int, int], vae_scale: int
) -> torch.Tensor:
    """An inpainting UNet's conditioning ``(B, 1 + C, h, w)`` when the whole image is to be painted
    (txt2img, img2img): mask ones, a grey image's latents (AUTOMATIC1111's txt2img conditioning)."""
    height, width = (side * vae_scale for side in latent_size)
    mask = torch.ones(batch, 1, height, width)
    latents = masked_image_latents(vae, torch.zeros(batch, 3, height, width), mask)
    return torch.cat([torch.ones(batch, 1, *latent_size).to(latents), latents], dim=1)


def pixel_mask(mask_image: Image.Image, init_size: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
    """A mask image (white: repaint, black: keep) at the output size ``(H, W)``, ``(1, 1, H, W)`` in {0, 1}.

    The mask goes through the init image's resize and center crop to ``size`` and is binarised at
    one half, as diffusers' mask processor does. ``init_size`` is PIL's ``(width, height)``.

    Raises:
        ConfigError: the mask's size is not ``init_size`` (the init image's).
    """
    if mask_image.size != init_size:
        raise ConfigError(
            f"mask_image: the mask is {mask_image.size[0]}x{mask_image.size[1]}, "
            f"expected the init image's size {init_size[0]}x{init_size[1]}"
        )
    pixels = image_pixels(mask_image.convert("L"), size)  # (3, H, W) in [-1, 1]
    return ((pixels[:1] + 1) / 2 >= 0.5).float()[None]  # (1, 1, H, W)


def skip_masked_image_draw(generators: list[torch.Generator], latent_shape: tuple[int, ...]) -> None:
    """Advance each generator past the masked image's posterior sample diffusers' inpainting pipelines draw
    after the starting noise (we use the posterior's mode), so Euler ancestral's noise matches theirs."""
    for generator in generators:
        torch.randn(latent_shape, generator=generator)
