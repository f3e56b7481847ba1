"""img2img and inpainting: where :class:`~trainer.sampling.sampler.Sampler`'s denoising loop starts from an image.

SDEdit (Meng et al. 2022): the init image's latents are noised to the timestep ``strength`` of the way
into the schedule and denoised from there. Inpainting with an inpainting UNet (9 input channels) uses
its own conditioning; with any other UNet, latent blending (Avrahami et al. 2023, Blended Latent
Diffusion). The randomness follows diffusers' img2img and inpainting pipelines
(:mod:`trainer.sampling.init_images`). Any output size ``(H, W)`` works, square or not: the init image
(and its mask) are resized, keeping their aspect, and center-cropped to it; an SDXL model is told the
init image's own size as its original size (``original_size``, unless given).

:class:`InitImageEncoder` is the VAE side (init images, masked images and masks to latents);
:func:`img2img_start` and :func:`inpaint_start` give the :class:`LoopStart` that the sampler's loop runs from.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from diffusers import AutoencoderKL, SchedulerMixin
from PIL import Image

from data_pipelines.transforms.masks import latent_mask
from trainer.sampling import init_images
from trainer.sampling.vae_codec import vae_in


def init_size(image: Image.Image) -> tuple[int, int]:
    """The init image's ``(h, w)``: SDXL's original size for img2img and inpainting."""
    return image.height, image.width


@dataclass(frozen=True)
class InitImageEncoder:
    """Init images, masked images and masks to latents, as diffusers' img2img and inpainting pipelines make them.

    Attributes:
        vae: the VAE that encodes.
        vae_dtype: the dtype it encodes in (:func:`~trainer.sampling.vae_codec.codec_dtype`).
        dtype: the UNet's dtype, of every tensor returned.
        vae_scale: pixels per latent along each side (8 for SD).
        device: the UNet's device.
    """

    vae: AutoencoderKL
    vae_dtype: torch.dtype
    dtype: torch.dtype
    vae_scale: int
    device: torch.device

    @torch.no_grad()
    def encode_image(
        self, image: Image.Image, size: tuple[int, int], generators: list[torch.Generator]
    ) -> torch.Tensor:
        """Scaled latents ``(B, C, h, w)`` of ``image`` (resized, center-cropped to ``size`` ``(H, W)``), one VAE
        posterior sample per generator, as diffusers' img2img draws them; encoded in the VAE's sampling dtype."""
        pixels = init_images.image_pixels(image, size)[None]  # (1, 3, H, W)
        with vae_in(self.vae, self.vae_dtype):
            latents = init_images.posterior_samples(self.vae, pixels, generators)
        return latents.to(self.dtype)

    @torch.no_grad()
    def init_and_noise(
        self, image: Image.Image, size: tuple[int, int], seeds: list[int]
    ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Generator]]:
        """The init image's latents ``(B, C, h, w)`` (posterior sampled with each image's generator),
        per-image noise of that shape, and the generators, in the order diffusers draws them."""
        generators = [torch.Generator("cpu").manual_seed(seed) for seed in seeds]
        init = self.encode_image(image, size, generators)  # (B, C, h, w)
        noise = torch.stack([torch.randn(init.shape[1:], generator=g) for g in generators]).to(init)
        return init, noise, generators

    def masked_image_latents(self, pixels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """See :func:`~trainer.sampling.init_images.masked_image_latents`; in the UNet's dtype."""
        with vae_in(self.vae, self.vae_dtype):
            latents = init_images.masked_image_latents(self.vae, pixels, mask)
        return latents.to(self.dtype)

    def full_mask_conditioning(self, batch: int, latent_size: tuple[int, int]) -> torch.Tensor:
        """See :func:`~trainer.sampling.init_images.full_mask_conditioning`; in the UNet's dtype."""
        with vae_in(self.vae, self.vae_dtype):
            conditioning = init_images.full_mask_conditioning(self.vae, batch, latent_size, self.vae_scale)
        return conditioning.to(self.dtype)

    def latent_mask(self, mask_image: Image.Image, init_size: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
        """A mask image (white: repaint, black: keep) -> ``(1, 1, h, w)`` in {0, 1} at latent resolution:
        :func:`~trainer.sampling.init_images.pixel_mask` at the output size ``(H, W)`` reduced to the latent grid
        (nearest)."""
        latent_size = (size[0] // self.vae_scale, size[1] // self.vae_scale)
        pixels = init_images.pixel_mask(mask_image, init_size, size)
        return latent_mask(pixels, latent_size).to(self.device, self.dtype)


@dataclass(frozen=True)
class LoopStart:
    """Where the denoising loop starts when it starts from an image.

    Attributes:
        latents: the loop's first latents ``(B, C, h, w)``.
        timesteps: the part of the schedule that runs (``strength`` of it).
        generators: each image's generator, after the draws made so far.
        original_size: the init image's ``(h, w)`` (SDXL's original size unless the settings give one).
        init: the init image's latents ``(B, C, h, w)``.
        mask: inpainting: ``(1, 1, h, w)`` in {0, 1}, 1 where the model draws.
        conditioning: an inpainting UNet's extra input ``(B, 1 + C, h, w)`` (mask, masked image's latents).
        after_step: latent blending (inpainting with any other UNet): ``(step index, latents) -> latents``.
    """

    latents: torch.Tensor
    timesteps: torch.Tensor
    generators: list[torch.Generator]
    original_size: tuple[int, int]
    init: torch.Tensor
    mask: torch.Tensor | None = None
    conditioning: torch.Tensor | None = None
    after_step: Callable[[int, torch.Tensor], torch.Tensor] | None = None


def img2img_start(
    encoder: InitImageEncoder,
    scheduler: SchedulerMixin,
    image: Image.Image,
    size: tuple[int, int],
    seeds: list[int],
    steps: int,
    strength: float,
) -> LoopStart:
    """img2img: ``image`` (resized and center-cropped to the output ``size``) noised to the timestep ``strength``
    of the way into a schedule of ``steps`` (SDEdit, Meng et al. 2022); ``strength`` in (0, 1]."""
    init_images.check_strength(strength)
    timesteps = init_images.partial_schedule(scheduler, steps, strength)
    init, noise, generators = encoder.init_and_noise(image, size, seeds)
    latents = scheduler.add_noise(init, noise, timesteps[:1].repeat(len(seeds)))
    return LoopStart(latents, timesteps, generators, init_size(image), init)


def inpaint_start(
    encoder: InitImageEncoder,
    scheduler: SchedulerMixin,
    image: Image.Image,
    mask_image: Image.Image,
    size: tuple[int, int],
    seeds: list[int],
    steps: int,
    strength: float,
    inpainting_unet: bool,
) -> LoopStart:
    """Inpainting: with an inpainting UNet (9 input channels) by its own conditioning, with any other by
    latent blending (Avrahami et al. 2023, Blended Latent Diffusion).

    An inpainting UNet sees the mask and the latents of the init image with the masked part grey
    at every step, as in diffusers' ``StableDiffusionInpaintPipeline``. Otherwise, after each step
    the latents outside the mask are replaced by the init image's latents noised to the next
    timestep (un-noised after the last step), so only the masked region is generated, in context.
    ``image`` is resized and center-cropped to the output ``size``; ``mask_image`` must have the
    init image's size and goes through the same crop.
    """
    init_images.check_strength(strength)
    mask = encoder.latent_mask(mask_image, image.size, size)
    timesteps = init_images.partial_schedule(scheduler, steps, strength)
    init, noise, generators = encoder.init_and_noise(image, size, seeds)
    init_images.skip_masked_image_draw(generators, tuple(init.shape[1:]))
    batch = len(seeds)
    if strength == 1.0:
        latents = noise * scheduler.init_noise_sigma
    else:
        latents = scheduler.add_noise(init, noise, timesteps[:1].repeat(batch))
    if inpainting_unet:
        pixels = init_images.image_pixels(image, size)[None]  # (1, 3, H, W) in [-1, 1]
        masked = encoder.masked_image_latents(pixels, init_images.pixel_mask(mask_image, image.size, size))
        conditioning = torch.cat([mask, masked], dim=1).expand(batch, -1, -1, -1)  # (B, 1 + C, h, w)
        return LoopStart(latents, timesteps, generators, init_size(image), init, mask, conditioning=conditioning)

    def blend(i: int, latents: torch.Tensor) -> torch.Tensor:
        known = init
        if i < len(timesteps) - 1:
            known = scheduler.add_noise(init, noise, timesteps[i + 1 : i + 2].repeat(batch))
        return (1 - mask) * known + mask * latents

    return LoopStart(latents, timesteps, generators, init_size(image), init, mask, after_step=blend)
