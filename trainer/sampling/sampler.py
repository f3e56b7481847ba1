"""txt2img and img2img with the parts of an export folder and :func:`trainer.sampling.denoise.denoise`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from PIL import Image
from transformers import CLIPTextModel, CLIPTokenizer

from data_pipelines.errors import DataError
from data_pipelines.frozen_encoders import encode_text, resolve_device
from data_pipelines.image_transforms import ResizeCrop, pixels_to_images
from trainer.sampling.denoise import denoise
from trainer.sampling.png_info import GenerationParameters
from trainer.sampling.schedulers import begin_at, display_name, make_scheduler


@dataclass
class SampleSettings:
    """Settings shared by every image of one call."""

    negative_prompt: str = ""
    steps: int = 25
    guidance_scale: float = 7.5
    guidance_rescale: float = 0.0
    scheduler: str = "ddim"
    height: int | None = None
    width: int | None = None


class Sampler:
    """Generates images with a UNet, VAE, CLIP text encoder and tokenizer.

    Args:
        unet, vae, text_encoder, tokenizer: the pipeline parts.
        scheduler_config: the training scheduler's config (betas, prediction type).
        model_name: written into each image's parameters.
    """

    def __init__(
        self,
        unet: UNet2DConditionModel,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        tokenizer: CLIPTokenizer,
        scheduler_config: dict,
        model_name: str = "",
    ) -> None:
        self.unet = unet.eval()
        self.vae = vae.eval()
        self.text_encoder = text_encoder.eval()
        self.tokenizer = tokenizer
        self.scheduler_config = dict(scheduler_config)
        self.model_name = model_name
        self.vae_scale = 2 ** (len(vae.config.block_out_channels) - 1)

    @classmethod
    def from_export(cls, folder: str | Path, device: str = "auto", dtype: str = "float32") -> Sampler:
        """Load an export folder (diffusers pipeline layout) from local disk.

        Raises:
            DataError: the folder is not a pipeline folder.
        """
        folder = Path(folder)
        if not (folder / "model_index.json").is_file():
            raise DataError(f"{folder}: not an export folder (model_index.json is missing)")
        torch_device, torch_dtype = resolve_device(device), getattr(torch, dtype)
        load = {"local_files_only": True}
        unet = UNet2DConditionModel.from_pretrained(folder / "unet", torch_dtype=torch_dtype, **load)
        vae = AutoencoderKL.from_pretrained(folder / "vae", torch_dtype=torch_dtype, **load)
        text_encoder = CLIPTextModel.from_pretrained(folder / "text_encoder", dtype=torch_dtype, **load)
        tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer", **load)
        config = DDPMScheduler.load_config(folder / "scheduler", **load)
        return cls(
            unet.to(torch_device), vae.to(torch_device), text_encoder.to(torch_device), tokenizer, config, folder.name
        )

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """Prompts -> text embeddings ``(B, T, D)``, exactly as precompute made the training data's."""
        return encode_text(self.tokenizer, self.text_encoder, prompts).to(self.unet.dtype)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> list[Image.Image]:
        """Scaled latents ``(B, C, h, w)`` -> RGB images."""
        pixels = self.vae.decode(latents.to(self.vae.dtype) / self.vae.config.scaling_factor).sample  # (B, 3, H, W)
        return pixels_to_images(pixels)

    def _size(self, settings: SampleSettings) -> tuple[int, int]:
        default = self.unet.config.sample_size * self.vae_scale
        return settings.height or default, settings.width or default

    def _noise(self, seeds: list[int], shape: tuple[int, ...]) -> tuple[torch.Tensor, list[torch.Generator]]:
        """Per-image noise ``(B, *shape)`` from per-image generators (same seed, same image, any batch)."""
        generators = [torch.Generator("cpu").manual_seed(seed) for seed in seeds]
        noise = torch.stack([torch.randn(shape, generator=g) for g in generators])
        return noise.to(self.device, self.unet.dtype), generators

    def _parameters(self, prompts, seeds, settings, height, width, strength=None) -> list[GenerationParameters]:
        return [
            GenerationParameters(
                prompt=prompt,
                negative_prompt=settings.negative_prompt,
                steps=settings.steps,
                sampler=display_name(settings.scheduler),
                guidance_scale=settings.guidance_scale,
                guidance_rescale=settings.guidance_rescale,
                seed=seed,
                width=width,
                height=height,
                model=self.model_name,
                strength=strength,
            )
            for prompt, seed in zip(prompts, seeds, strict=True)
        ]

    def txt2img(
        self, prompts: list[str], seeds: list[int], settings: SampleSettings
    ) -> tuple[list[Image.Image], list[GenerationParameters]]:
        """Generate one image per (prompt, seed) from pure noise."""
        height, width = self._size(settings)
        scheduler = make_scheduler(settings.scheduler, self.scheduler_config)
        scheduler.set_timesteps(settings.steps, device=self.device)
        shape = (self.unet.config.in_channels, height // self.vae_scale, width // self.vae_scale)
        noise, generators = self._noise(seeds, shape)
        latents = denoise(
            self.unet,
            scheduler,
            noise * scheduler.init_noise_sigma,
            self.encode_prompts(prompts),
            self.encode_prompts([settings.negative_prompt] * len(prompts)),
            settings.guidance_scale,
            scheduler.timesteps,
            generator=generators,
            guidance_rescale=settings.guidance_rescale,
        )
        return self.decode(latents), self._parameters(prompts, seeds, settings, height, width)

    @torch.no_grad()
    def img2img(
        self, init_image: Image.Image, prompts: list[str], seeds: list[int], settings: SampleSettings, strength: float
    ) -> tuple[list[Image.Image], list[GenerationParameters]]:
        """Re-draw ``init_image`` (resized and center-cropped to the output size) per prompt.

        ``strength`` in (0, 1] is the fraction of the schedule run: the image is noised to the
        timestep ``strength`` of the way into the schedule and denoised from there (SDEdit, Meng et al. 2022).
        """
        if not 0.0 < strength <= 1.0:
            raise ValueError(f"strength={strength}: expected 0 < strength <= 1")
        height, width = self._size(settings)
        if height != width:
            raise ValueError(f"img2img takes square sizes for now; got {height}x{width}")
        pixels, _ = ResizeCrop(height, crop="center")(init_image.convert("RGB"))
        init = self.vae.encode(pixels[None].to(self.device, self.vae.dtype)).latent_dist.mode()
        init = (init * self.vae.config.scaling_factor).to(self.unet.dtype)  # (1, C, h, w)
        scheduler = make_scheduler(settings.scheduler, self.scheduler_config)
        scheduler.set_timesteps(settings.steps, device=self.device)
        run_steps = max(1, min(settings.steps, round(settings.steps * strength)))
        timesteps = scheduler.timesteps[(settings.steps - run_steps) * scheduler.order :]
        noise, generators = self._noise(seeds, tuple(init.shape[1:]))
        begin_at(scheduler, (settings.steps - run_steps) * scheduler.order)
        latents = scheduler.add_noise(init.expand(len(prompts), -1, -1, -1), noise, timesteps[:1].repeat(len(prompts)))
        latents = denoise(
            self.unet,
            scheduler,
            latents,
            self.encode_prompts(prompts),
            self.encode_prompts([settings.negative_prompt] * len(prompts)),
            settings.guidance_scale,
            timesteps,
            generator=generators,
            guidance_rescale=settings.guidance_rescale,
        )
        return self.decode(latents), self._parameters(prompts, seeds, settings, height, width, strength)
