"""txt2img, img2img and inpainting with the parts of an export folder and :func:`trainer.sampling.denoise.denoise`.

Randomness follows diffusers' pipelines: image ``i`` has its own CPU generator seeded with its
seed, which draws (img2img, inpainting) the VAE posterior sample, then the starting noise, then
(inpainting) the masked image's posterior sample, then Euler ancestral's noise; so a seed gives the
same image at any batch size, and the same as ``StableDiffusionPipeline`` and its img2img and
inpainting pipelines (standard UNet) given ``generator=[...]``.

An SDXL export (``text_encoder_2/``) samples as ``StableDiffusionXLPipeline`` and its img2img and
inpainting pipelines do (:mod:`trainer.sampling.conditioning`): both encoders' penultimate states and
the pooled embedding, zeros when no negative prompt is given (``force_zeros_for_empty_prompt``, as
caption dropout trained it), and time_ids of original size and crop top-left (default: the image's
size and (0, 0)) and target size = the image's size. Parts: loading in :mod:`~trainer.sampling.loading`,
init images and masks in :mod:`~trainer.sampling.init_images`, the loop in :mod:`~trainer.sampling.denoise`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, SchedulerMixin, UNet2DConditionModel
from PIL import Image
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from data_pipelines.transforms.images import pixels_to_images
from data_pipelines.transforms.masks import latent_mask
from lf_common.errors import ConfigError, DataError
from trainer.checkpoint.export import is_sdxl_unet
from trainer.sampling import init_images
from trainer.sampling.conditioning import encode_negative_prompt, encode_prompts, sdxl_time_ids
from trainer.sampling.denoise import SDXLConditioning, denoise
from trainer.sampling.loading import checkpoint_parts, export_parts
from trainer.sampling.png_info import GenerationParameters
from trainer.sampling.schedulers import check_scheduler, display_name, sampling_scheduler

_MODEL_MARKERS = ("model_index.json", "latest")  # an export folder; a DeepSpeed checkpoint folder


@dataclass
class SampleSettings:
    """Settings shared by every image of one call.

    ``negative_prompt`` ``None``: none given. ``original_size`` ``(h, w)`` and ``crop_top_left``
    ``(top, left)``: SDXL's micro-conditioning (default: the output size and (0, 0)); SDXL only.
    """

    negative_prompt: str | None = None
    steps: int = 25
    guidance_scale: float = 7.5
    guidance_rescale: float = 0.0
    scheduler: str = "ddim"
    use_karras_sigmas: bool = False
    height: int | None = None
    width: int | None = None
    original_size: tuple[int, int] | None = None
    crop_top_left: tuple[int, int] = (0, 0)

    def __post_init__(self) -> None:
        check_scheduler(self.scheduler, self.use_karras_sigmas)

    @property
    def micro_conditioning(self) -> bool:
        """Whether SDXL's size/crop inputs differ from their defaults."""
        return self.original_size is not None or tuple(self.crop_top_left) != (0, 0)


class Sampler:
    """Generates images with a UNet, VAE, CLIP text encoder and tokenizer.

    Args:
        unet, vae, text_encoder, tokenizer: the pipeline parts.
        scheduler_config: the training scheduler's config (betas, prediction type).
        model_name: written into each image's parameters.
        vae_slicing: decode a batch one image at a time (less memory for large batches).
        vae_tiling: decode (and encode) large images in overlapping tiles (less memory for large sizes).
        text_encoder_2, tokenizer_2: SDXL's second text encoder and tokenizer (an SDXL UNet needs them).
        force_zeros_for_empty_prompt: SDXL: zeros, not the encoding of ``""``, when no negative prompt is
            given (the pipeline config's flag of that name).
    """

    def __init__(
        self,
        unet: UNet2DConditionModel,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        tokenizer: CLIPTokenizer,
        scheduler_config: dict,
        model_name: str = "",
        vae_slicing: bool = False,
        vae_tiling: bool = False,
        text_encoder_2: CLIPTextModelWithProjection | None = None,
        tokenizer_2: CLIPTokenizer | None = None,
        force_zeros_for_empty_prompt: bool = True,
    ) -> None:
        if is_sdxl_unet(unet) != (text_encoder_2 is not None and tokenizer_2 is not None):
            raise DataError(
                "an SDXL UNet (addition_embed_type text_time) samples with text_encoder_2 and tokenizer_2, and "
                "only it does: the export folder's parts do not fit together"
            )
        self.text_encoder_2 = text_encoder_2.eval() if text_encoder_2 is not None else None
        self.tokenizer_2 = tokenizer_2
        self.force_zeros_for_empty_prompt = force_zeros_for_empty_prompt
        self.unet = unet.eval()
        self.vae = vae.eval()
        self.text_encoder = text_encoder.eval()
        self.tokenizer = tokenizer
        self.scheduler_config = dict(scheduler_config)
        self.model_name = model_name
        self.vae_scale = 2 ** (len(vae.config.block_out_channels) - 1)
        self.latent_channels = int(vae.config.latent_channels)
        # SD's inpainting UNets take latents + mask + masked-image latents (9 = 4 + 1 + 4 channels)
        self.inpainting_unet = unet.config.in_channels == 2 * self.latent_channels + 1
        if vae_slicing:
            self.vae.enable_slicing()
        if vae_tiling:
            self.vae.enable_tiling()

    @classmethod
    def from_export(cls, folder: str | Path, device: str = "auto", dtype: str = "float32", **options: bool) -> Sampler:
        """Load an export folder (diffusers pipeline layout) from local disk.

        Raises:
            DataError: the folder is not a pipeline folder.
        """
        return cls(**export_parts(Path(folder), device, dtype), **options)

    @classmethod
    def from_checkpoint(
        cls,
        ckpt_path: str | Path,
        weights: str = "auto",
        device: str = "auto",
        dtype: str = "float32",
        vae_path: str | None = None,
        text_encoder_path: str | None = None,
        tokenizer_path: str | None = None,
        **options: bool,
    ) -> Sampler:
        """Load a Lightning ``.ckpt`` or DeepSpeed checkpoint folder directly, without exporting.

        The UNet is rebuilt from the config stored in the checkpoint (EMA weights with ``weights``
        ``"auto"``/``"ema"``, the raw ones with ``"raw"``); the VAE, text encoder and tokenizer come
        from the folders the checkpoint's latent-shard manifest names, unless given.
        """
        parts = checkpoint_parts(ckpt_path, weights, device, dtype, vae_path, text_encoder_path, tokenizer_path)
        return cls(**parts, **options)

    @classmethod
    def load(cls, path: str | Path, **kwargs) -> Sampler:
        """An export folder (``model_index.json`` inside) or else a training checkpoint (:meth:`from_checkpoint`)."""
        folder = Path(path)
        if not folder.exists() or (folder.is_dir() and not any((folder / n).is_file() for n in _MODEL_MARKERS)):
            what = "does not exist" if not folder.exists() else "is neither an export folder nor a DeepSpeed checkpoint"
            raise DataError(
                f"model_dir={path}: {what}; give an export folder (lf-export's out_dir, with model_index.json) "
                "or a training checkpoint (<output_dir>/checkpoints/last.ckpt)"
            )
        if (folder / "model_index.json").is_file():
            for key in ("weights", "vae_path", "text_encoder_path", "tokenizer_path"):
                kwargs.pop(key, None)
            return cls.from_export(path, **kwargs)
        return cls.from_checkpoint(path, **kwargs)

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """Prompts -> text embeddings ``(B, T, D)``, exactly as precompute made the training data's."""
        return self.encode_prompts_and_pooled(prompts)[0]

    def _text_parts(self) -> tuple[list[CLIPTokenizer], list[CLIPTextModel | CLIPTextModelWithProjection]]:
        if self.text_encoder_2 is None or self.tokenizer_2 is None:
            return [self.tokenizer], [self.text_encoder]
        return [self.tokenizer, self.tokenizer_2], [self.text_encoder, self.text_encoder_2]

    def encode_prompts_and_pooled(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Prompts -> ``(text (B, T, D), pooled (B, P))`` as precompute made them; ``pooled`` only for SDXL."""
        text, pooled = encode_prompts(*self._text_parts(), prompts)
        return text.to(self.unet.dtype), pooled.to(self.unet.dtype) if pooled is not None else None

    def negative_embeddings(self, negative_prompt: str | None, batch: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The negative prompt's ``(text (B, T, D), pooled (B, P) or None)``, as diffusers encodes it
        (:func:`~trainer.sampling.conditioning.encode_negative_prompt`)."""
        text, pooled = encode_negative_prompt(
            *self._text_parts(), negative_prompt, batch, self.force_zeros_for_empty_prompt
        )
        return text.to(self.unet.dtype), pooled.to(self.unet.dtype) if pooled is not None else None

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> list[Image.Image]:
        """Scaled latents ``(B, C, h, w)`` -> RGB images."""
        pixels = self.vae.decode(latents.to(self.vae.dtype) / self.vae.config.scaling_factor).sample  # (B, 3, H, W)
        return pixels_to_images(pixels)

    def image_size(self, settings: SampleSettings) -> tuple[int, int]:
        """``(height, width)`` of the images ``settings`` give (default: UNet sample size times the VAE's factor)."""
        default = self.unet.config.sample_size * self.vae_scale
        return settings.height or default, settings.width or default

    def txt2img_batches(
        self, prompts: list[str], seeds: list[int], settings: SampleSettings, batch_size: int
    ) -> tuple[list[Image.Image], list[GenerationParameters]]:
        """:meth:`txt2img` ``batch_size`` images at a time (the same images: each has its own generator)."""
        images: list[Image.Image] = []
        parameters: list[GenerationParameters] = []
        for start in range(0, len(prompts), batch_size):
            batch = self.txt2img(prompts[start : start + batch_size], seeds[start : start + batch_size], settings)
            images += batch[0]
            parameters += batch[1]
        return images, parameters

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
                sampler=display_name(settings.scheduler, settings.use_karras_sigmas),
                guidance_scale=settings.guidance_scale,
                guidance_rescale=settings.guidance_rescale,
                seed=seed,
                width=width,
                height=height,
                model=self.model_name,
                strength=strength,
                original_size=settings.original_size,
                crop_top_left=settings.crop_top_left,
            )
            for prompt, seed in zip(prompts, seeds, strict=True)
        ]

    def _denoise(
        self,
        scheduler: SchedulerMixin,
        latents: torch.Tensor,
        prompts: list[str],
        settings: SampleSettings,
        timesteps: torch.Tensor,
        generators: list[torch.Generator],
        after_step: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
        conditioning: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run the denoising loop on ``latents`` ``(B, C, h, w)`` with classifier-free guidance; an inpainting
        UNet gets ``conditioning`` ``(B, 1 + C, h, w)`` (default: everything masked, as for txt2img)."""
        if self.inpainting_unet and conditioning is None:
            conditioning = self.full_mask_conditioning(latents.shape[0], latents.shape[-2:])
        cond, pooled = self.encode_prompts_and_pooled(prompts)
        uncond, uncond_pooled = self.negative_embeddings(settings.negative_prompt, len(prompts))
        sdxl = None
        if pooled is not None and uncond_pooled is not None:
            size = tuple(side * self.vae_scale for side in latents.shape[-2:])
            ids = sdxl_time_ids(size, len(prompts), settings.original_size, settings.crop_top_left)  # (B, 6)
            sdxl = SDXLConditioning(pooled, uncond_pooled, ids.to(self.device, cond.dtype))
        elif settings.micro_conditioning:
            raise ConfigError("original_size and crop_top_left condition SDXL models only; this model is not one")
        return denoise(
            self.unet,
            scheduler,
            latents,
            cond,
            uncond,
            settings.guidance_scale,
            timesteps,
            generator=generators,
            guidance_rescale=settings.guidance_rescale,
            after_step=after_step,
            conditioning=conditioning,
            sdxl=sdxl,
        )

    def masked_image_latents(self, pixels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """See :func:`~trainer.sampling.init_images.masked_image_latents`; in the UNet's dtype."""
        return init_images.masked_image_latents(self.vae, pixels, mask).to(self.unet.dtype)

    def full_mask_conditioning(self, batch: int, latent_size: tuple[int, int]) -> torch.Tensor:
        """See :func:`~trainer.sampling.init_images.full_mask_conditioning`; in the UNet's dtype."""
        return init_images.full_mask_conditioning(self.vae, batch, latent_size, self.vae_scale).to(self.unet.dtype)

    @torch.no_grad()
    def txt2img(
        self, prompts: list[str], seeds: list[int], settings: SampleSettings
    ) -> tuple[list[Image.Image], list[GenerationParameters]]:
        """Generate one image per (prompt, seed) from pure noise."""
        height, width = self.image_size(settings)
        scheduler = self._scheduler(settings)
        shape = (self.latent_channels, height // self.vae_scale, width // self.vae_scale)
        noise, generators = self._noise(seeds, shape)
        latents = self._denoise(
            scheduler, noise * scheduler.init_noise_sigma, prompts, settings, scheduler.timesteps, generators
        )
        return self.decode(latents), self._parameters(prompts, seeds, settings, height, width)

    def _scheduler(self, settings: SampleSettings) -> SchedulerMixin:
        s = settings
        return sampling_scheduler(s.scheduler, self.scheduler_config, s.use_karras_sigmas, s.steps, self.device)

    def _square_size(self, settings: SampleSettings) -> int:
        height, width = self.image_size(settings)
        if height != width:
            raise ConfigError(f"img2img and inpainting take square sizes for now; got {height}x{width}")
        return height

    @torch.no_grad()
    def encode_image(self, image: Image.Image, size: int, generators: list[torch.Generator]) -> torch.Tensor:
        """Scaled latents ``(B, C, h, w)`` of ``image`` (resized, center-cropped to ``size``), one VAE
        posterior sample per generator, as diffusers' img2img draws them."""
        pixels = init_images.image_pixels(image, size)[None]  # (1, 3, S, S)
        return init_images.posterior_samples(self.vae, pixels, generators).to(self.unet.dtype)

    @torch.no_grad()
    def _init_and_noise(
        self, init_image: Image.Image, size: int, seeds: list[int]
    ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Generator]]:
        """The init image's latents ``(B, C, h, w)`` (posterior sampled with each image's generator),
        per-image noise of that shape, and the generators, in the order diffusers draws them."""
        generators = [torch.Generator("cpu").manual_seed(seed) for seed in seeds]
        init = self.encode_image(init_image, size, generators)  # (B, C, h, w)
        noise = torch.stack([torch.randn(init.shape[1:], generator=g) for g in generators]).to(init)
        return init, noise, generators

    def img2img(
        self, init_image: Image.Image, prompts: list[str], seeds: list[int], settings: SampleSettings, strength: float
    ) -> tuple[list[Image.Image], list[GenerationParameters]]:
        """Re-draw ``init_image`` (resized and center-cropped to the output size) per prompt.

        ``strength`` in (0, 1] is the fraction of the schedule run: the image is noised to the
        timestep ``strength`` of the way into the schedule and denoised from there (SDEdit, Meng et al. 2022).
        """
        init_images.check_strength(strength)
        size = self._square_size(settings)
        scheduler = self._scheduler(settings)
        timesteps = init_images.partial_schedule(scheduler, settings.steps, strength)
        init, noise, generators = self._init_and_noise(init_image, size, seeds)
        latents = scheduler.add_noise(init, noise, timesteps[:1].repeat(len(prompts)))
        latents = self._denoise(scheduler, latents, prompts, settings, timesteps, generators)
        return self.decode(latents), self._parameters(prompts, seeds, settings, size, size, strength)

    def latent_mask(self, mask_image: Image.Image, init_size: tuple[int, int], size: int) -> torch.Tensor:
        """A mask image (white: repaint, black: keep) -> ``(1, 1, h, w)`` in {0, 1} at latent resolution:
        :meth:`pixel_mask` reduced to the latent grid (nearest)."""
        latent_size = (size // self.vae_scale, size // self.vae_scale)
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
        ``init_image`` is resized and center-cropped to the (square) output size; ``mask_image`` must
        have the init image's size and goes through the same crop.

        Returns:
            ``(latents (B, C, h, w), init latents (B, C, h, w), mask (1, 1, h, w))``.
        """
        init_images.check_strength(strength)
        size = self._square_size(settings)
        mask = self.latent_mask(mask_image, init_image.size, size)
        scheduler = self._scheduler(settings)
        timesteps = init_images.partial_schedule(scheduler, settings.steps, strength)
        init, noise, generators = self._init_and_noise(init_image, size, seeds)
        init_images.skip_masked_image_draw(generators, tuple(init.shape[1:]))
        if strength == 1.0:
            latents = noise * scheduler.init_noise_sigma
        else:
            latents = scheduler.add_noise(init, noise, timesteps[:1].repeat(len(prompts)))
        if self.inpainting_unet:
            pixels = init_images.image_pixels(init_image, size)[None]  # (1, 3, S, S) in [-1, 1]
            masked = self.masked_image_latents(pixels, self.pixel_mask(mask_image, init_image.size, size))
            conditioning = torch.cat([mask, masked], dim=1).expand(len(prompts), -1, -1, -1)  # (B, 1 + C, h, w)
            latents = self._denoise(scheduler, latents, prompts, settings, timesteps, generators, None, conditioning)
            return latents, init, mask

        def blend(i: int, latents: torch.Tensor) -> torch.Tensor:
            known = init
            if i < len(timesteps) - 1:
                known = scheduler.add_noise(init, noise, timesteps[i + 1 : i + 2].repeat(len(prompts)))
            return (1 - mask) * known + mask * latents

        latents = self._denoise(scheduler, latents, prompts, settings, timesteps, generators, after_step=blend)
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
        size = self._square_size(settings)
        return self.decode(latents), self._parameters(prompts, seeds, settings, size, size, strength)
