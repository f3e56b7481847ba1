"""img2img and inpainting: the parts of :class:`~trainer.sampling.sampler.Sampler` that start from an image.

SDEdit (Meng et al. 2022): the init image's latents are noised to the timestep ``strength`` of the way
into the schedule and denoised from there. Inpainting with an inpainting UNet (9 input channels) uses
its own conditioning; with any other UNet, latent blending (Avrahami et al. 2023, Blended Latent
Diffusion). The randomness follows diffusers' img2img and inpainting pipelines
(:mod:`trainer.sampling.init_images`). Any output size ``(H, W)`` works, square or not: the init image
(and its mask) are resized, keeping their aspect, and center-cropped to it; an SDXL model is told the
init image's own size as its original size (``original_size``, unless given).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from diffusers import AutoencoderKL, SchedulerMixin, UNet2DConditionModel
from PIL import Image

from data_pipelines.transforms.masks import latent_mask
from trainer.sampling import init_images
from trainer.sampling.png_info import GenerationParameters
from trainer.sampling.settings import SampleSettings
from trainer.sampling.vae_codec import vae_in


class ImageToImage:
    """img2img and inpainting, mixed into :class:`~trainer.sampling.sampler.Sampler` (which defines the members
    declared here: the parts, the UNet's loop and the scheduler, decoding and the images' parameters)."""

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    vae_scale: int
    inpainting_unet: bool
    device: torch.device
    vae_dtype: torch.dtype
    image_size: Callable[[SampleSettings], tuple[int, int]]
    decode: Callable[[torch.Tensor], list[Image.Image]]
    _scheduler: Callable[[SampleSettings], SchedulerMixin]
    _denoise: Callable[..., torch.Tensor]
    _parameters: Callable[..., list[GenerationParameters]]

    @staticmethod
    def init_size(image: Image.Image) -> tuple[int, int]:
        """The init image's ``(h, w)``: SDXL's original size for img2img and inpainting."""
        return image.height, image.width

    @torch.no_grad()
    def encode_image(
        self, image: Image.Image, size: tuple[int, int], generators: list[torch.Generator]
    ) -> torch.Tensor:
        """Scaled latents ``(B, C, h, w)`` of ``image`` (resized, center-cropped to ``size`` ``(H, W)``), one VAE
        posterior sample per generator, as diffusers' img2img draws them; encoded in the VAE's sampling dtype."""
        pixels = init_images.image_pixels(image, size)[None]  # (1, 3, H, W)
        with vae_in(self.vae, self.vae_dtype):
            latents = init_images.posterior_samples(self.vae, pixels, generators)
        return latents.to(self.unet.dtype)

    def masked_image_latents(self, pixels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """See :func:`~trainer.sampling.init_images.masked_image_latents`; in the UNet's dtype."""
        with vae_in(self.vae, self.vae_dtype):
            latents = init_images.masked_image_latents(self.vae, pixels, mask)
        return latents.to(self.unet.dtype)

    def full_mask_conditioning(self, batch: int, latent_size: tuple[int, int]) -> torch.Tensor:
        """See :func:`~trainer.sampling.init_images.full_mask_conditioning`; in the UNet's dtype."""
        with vae_in(self.vae, self.vae_dtype):
            conditioning = init_images.full_mask_conditioning(self.vae, batch, latent_size, self.vae_scale)
        return conditioning.to(self.unet.dtype)

    @torch.no_grad()
    def _init_and_noise(
        self, init_image: Image.Image, size: tuple[int, int], seeds: list[int]
    ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Generator]]:
        """The init image's latents ``(B, C, h, w)`` (posterior sampled with each image's generator),
        per-image noise of that shape, and the generators, in the order diffusers draws them."""
        generators = [torch.Generator("cpu").manual_seed(seed) for seed in seeds]
        init = self.encode_image(init_image, size, generators)  # (B, C, h, w)
        noise = torch.stack([torch.randn(init.shape[1:], generator=g) for g in generators]).to(init)
        return init, noise, generators

    @torch.no_grad()
    def img2img(
        self, init_image: Image.Image, prompts: list[str], seeds: list[int], settings: SampleSettings, strength: float
    ) -> tuple[list[Image.Image], list[GenerationParameters]]:
        """Re-draw ``init_image`` (resized and center-cropped to the output size) per prompt.

        ``strength`` in (0, 1] is the fraction of the schedule run: the image is noised to the
        timestep ``strength`` of the way into the schedule and denoised from there (SDEdit, Meng et al. 2022).
        """
        init_images.check_strength(strength)
        size = self.image_size(settings)
        scheduler = self._scheduler(settings)
        timesteps = init_images.partial_schedule(scheduler, settings.steps, strength)
        init, noise, generators = self._init_and_noise(init_image, size, seeds)
        latents = scheduler.add_noise(init, noise, timesteps[:1].repeat(len(prompts)))
        original = self.init_size(init_image)
        latents = self._denoise(scheduler, latents, prompts, settings, timesteps, generators, original_size=original)
        return self.decode(latents), self._parameters(prompts, seeds, settings, size, strength, original)

    def latent_mask(self, mask_image: Image.Image, init_size: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
        """A mask image (white: repaint, black: keep) -> ``(1, 1, h, w)`` in {0, 1} at latent resolution:
        :meth:`pixel_mask` at the output size ``(H, W)`` reduced to the latent grid (nearest)."""
        latent_size = (size[0] // self.vae_scale, size[1] // self.vae_scale)
        return latent_mask(self.pixel_mask(mask_image, init_size, size), latent_size).to(self.device, self.unet.dtype)

    pixel_mask = staticmethod(init_images.pixel_mask)

    @torch.no_grad()
    def inpaint_latents(
        self,
        init_image: Image.Image,
        mask_image: Image.Image,
        prompts: list[str],
        seeds: list[int],
        settings: SampleSettings,
        strength: float = 1.0,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Inpaint: with an inpainting UNet (9 input channels) by its own conditioning, with any other by
        latent blending (Avrahami et al. 2023, Blended Latent Diffusion).

        An inpainting UNet sees the mask and the latents of the init image with the masked part grey
        at every step, as in diffusers' ``StableDiffusionInpaintPipeline``. Otherwise, after each step
        the latents outside the mask are replaced by the init image's latents noised to the next
        timestep (un-noised after the last step), so only the masked region is generated, in context.
        ``init_image`` is resized and center-cropped to the output size; ``mask_image`` must have the
        init image's size and goes through the same crop.

        Returns:
            ``(latents (B, C, h, w), init latents (B, C, h, w), mask (1, 1, h, w))``.
        """
        init_images.check_strength(strength)
        size = self.image_size(settings)
        mask = self.latent_mask(mask_image, init_image.size, size)
        scheduler = self._scheduler(settings)
        timesteps = init_images.partial_schedule(scheduler, settings.steps, strength)
        init, noise, generators = self._init_and_noise(init_image, size, seeds)
        init_images.skip_masked_image_draw(generators, tuple(init.shape[1:]))
        if strength == 1.0:
            latents = noise * scheduler.init_noise_sigma
        else:
            latents = scheduler.add_noise(init, noise, timesteps[:1].repeat(len(prompts)))
        common: dict[str, Any] = {"generators": generators, "original_size": self.init_size(init_image)}
        if self.inpainting_unet:
            pixels = init_images.image_pixels(init_image, size)[None]  # (1, 3, H, W) in [-1, 1]
            masked = self.masked_image_latents(pixels, self.pixel_mask(mask_image, init_image.size, size))
            conditioning = torch.cat([mask, masked], dim=1).expand(len(prompts), -1, -1, -1)  # (B, 1 + C, h, w)
            common["conditioning"] = conditioning
            latents = self._denoise(scheduler, latents, prompts, settings, timesteps, **common)
            return latents, init, mask

        def blend(i: int, latents: torch.Tensor) -> torch.Tensor:
            known = init
            if i < len(timesteps) - 1:
                known = scheduler.add_noise(init, noise, timesteps[i + 1 : i + 2].repeat(len(prompts)))
            return (1 - mask) * known + mask * latents

        latents = self._denoise(scheduler, latents, prompts, settings, timesteps, after_step=blend, **common)
        return latents, init, mask

    def inpaint(
        self,
        init_image: Image.Image,
        mask_image: Image.Image,
        prompts: list[str],
        seeds: list[int],
        settings: SampleSettings,
        strength: float = 1.0,
    ) -> tuple[list[Image.Image], list[GenerationParameters]]:
        """Images of :meth:`inpaint_latents`, with their parameters."""
        latents, _, _ = self.inpaint_latents(init_image, mask_image, prompts, seeds, settings, strength)
        size = self.image_size(settings)
        parameters = self._parameters(prompts, seeds, settings, size, strength, self.init_size(init_image))
        return self.decode(latents), parameters
