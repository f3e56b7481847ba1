"""txt2img, img2img and inpainting with the parts of an export folder: the :class:`Sampler` that holds them.

Randomness follows diffusers' pipelines: image ``i`` has its own CPU generator seeded with its
seed, which draws (img2img, inpainting) the VAE posterior sample, then the starting noise, then
(inpainting) the masked image's posterior sample, then Euler ancestral's noise; so a seed gives the
same image at any batch size, and the same as ``StableDiffusionPipeline`` and its img2img and
inpainting pipelines (standard UNet) given ``generator=[...]``.

An SDXL export (``text_encoder_2/``) samples as ``StableDiffusionXLPipeline`` and its img2img and
inpainting pipelines do. The parts, by role: what a call asks for in :mod:`~trainer.sampling.settings`;
loading in :mod:`~trainer.sampling.loading`; prompts, negative prompts and SDXL's pooled embeddings and
time_ids in :mod:`~trainer.sampling.conditioning`; the loop in :mod:`~trainer.sampling.denoise`;
where img2img and inpainting start in :mod:`~trainer.sampling.image_to_image` (their inputs in
:mod:`~trainer.sampling.init_images`); latents to images (SDXL's float16 upcast) in
:mod:`~trainer.sampling.vae_codec`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from diffusers import AutoencoderKL, SchedulerMixin, UNet2DConditionModel
from PIL import Image
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from data_pipelines.latents.text_encoding import TextEncoding
from lf_common.errors import DataError
from trainer.diffusion.unet_kinds import is_inpainting_unet, is_sdxl_unet
from trainer.sampling.conditioning import PromptEncoder
from trainer.sampling.denoise import denoise
from trainer.sampling.image_to_image import InitImageEncoder, LoopStart, img2img_start, init_size, inpaint_start
from trainer.sampling.loading import checkpoint_parts, export_parts
from trainer.sampling.png_info import GenerationParameters
from trainer.sampling.schedulers import display_name, sampling_scheduler
from trainer.sampling.settings import SampleSettings
from trainer.sampling.vae_codec import codec_dtype, decode_images

__all__ = ["SampleSettings", "Sampler"]

_MODEL_MARKERS = ("model_index.json", "latest")  # an export folder; a DeepSpeed checkpoint folder


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
        text_encoding: long prompts (``max_token_length``) and ``clip_skip`` as the training captions were
            encoded (the latent manifest's record; export folders and checkpoints carry it); None: the defaults.
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
        text_encoding: TextEncoding | None = None,
    ) -> None:
        if is_sdxl_unet(unet.config) != (text_encoder_2 is not None and tokenizer_2 is not None):
            raise DataError(
                "an SDXL UNet (addition_embed_type text_time) samples with text_encoder_2 and tokenizer_2, and "
                "only it does: the export folder's parts do not fit together"
            )
        self.text_encoder_2 = text_encoder_2.eval() if text_encoder_2 is not None else None
        self.tokenizer_2 = tokenizer_2
        self.force_zeros_for_empty_prompt = force_zeros_for_empty_prompt
        self.text_encoding = text_encoding or TextEncoding()
        self.text_encoding.check_sdxl(text_encoder_2 is not None)
        self.unet = unet.eval()
        self.vae = vae.eval()
        self.text_encoder = text_encoder.eval()
        self.tokenizer = tokenizer
        self.scheduler_config = dict(scheduler_config)
        self.model_name = model_name
        self.vae_scale = 2 ** (len(vae.config.block_out_channels) - 1)
        self.latent_channels = int(vae.config.latent_channels)
        # SD's inpainting UNets take latents + mask + masked-image latents (9 = 4 + 1 + 4 channels)
        self.inpainting_unet = is_inpainting_unet(unet.config)
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

    @property
    def sdxl(self) -> bool:
        """Whether this is an SDXL model (two text encoders, pooled embeddings and time_ids)."""
        return self.text_encoder_2 is not None

    @property
    def prompt_encoder(self) -> PromptEncoder:
        """The text side: tokenizers and text encoders (SDXL's two), embeddings in the UNet's dtype."""
        if self.text_encoder_2 is None or self.tokenizer_2 is None:
            tokenizers, encoders = [self.tokenizer], [self.text_encoder]
        else:
            tokenizers, encoders = [self.tokenizer, self.tokenizer_2], [self.text_encoder, self.text_encoder_2]
        return PromptEncoder(
            tokenizers, encoders, self.unet.dtype, self.force_zeros_for_empty_prompt, self.text_encoding
        )

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """Prompts -> text embeddings ``(B, T, D)``, exactly as precompute made the training data's."""
        return self.prompt_encoder.encode(prompts)[0]

    def encode_prompts_and_pooled(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Prompts -> ``(text (B, T, D), pooled (B, P))`` as precompute made them; ``pooled`` only for SDXL."""
        return self.prompt_encoder.encode(prompts)

    def negative_embeddings(
        self, negative_prompt: str | None, batch: int, negative_prompt_2: str | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The negative prompt's ``(text (B, T, D), pooled (B, P) or None)``, as diffusers encodes it
        (:func:`~trainer.sampling.conditioning.encode_negative_prompt`)."""
        return self.prompt_encoder.negative(negative_prompt, batch, negative_prompt_2)

    @property
    def vae_dtype(self) -> torch.dtype:
        """The dtype the VAE decodes and encodes in: float32 for SDXL's in float16 (``force_upcast``),
        else its own (:func:`~trainer.sampling.vae_codec.codec_dtype`)."""
        return codec_dtype(self.vae, self.sdxl)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> list[Image.Image]:
        """Scaled latents ``(B, C, h, w)`` -> RGB images, decoded in :attr:`vae_dtype`."""
        return decode_images(self.vae, latents, self.vae_dtype)

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

    def _parameters(
        self,
        prompts: list[str],
        seeds: list[int],
        settings: SampleSettings,
        size: tuple[int, int],
        strength: float | None = None,
        original_size: tuple[int, int] | None = None,
    ) -> list[GenerationParameters]:
        """Each image's parameters; an SDXL original size other than the output size ``(H, W)`` is written."""
        height, width = size
        original = settings.original_size or (original_size if self.sdxl else None)
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
                original_size=original if original != size else settings.original_size,
                crop_top_left=settings.crop_top_left,
                prompt_2=settings.prompt_2,
                negative_prompt_2=settings.negative_prompt_2,
                clip_skip=self.text_encoding.clip_skip,
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
        original_size: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        """Run the denoising loop on ``latents`` ``(B, C, h, w)`` with classifier-free guidance; an inpainting
        UNet gets ``conditioning`` ``(B, 1 + C, h, w)`` (default: everything masked, as for txt2img).
        ``original_size``: SDXL's original size when the settings give none (default: the output size)."""
        if self.inpainting_unet and conditioning is None:
            conditioning = self.init_image_encoder.full_mask_conditioning(latents.shape[0], latents.shape[-2:])
        size = (latents.shape[-2] * self.vae_scale, latents.shape[-1] * self.vae_scale)
        cond, uncond, sdxl = self.prompt_encoder.guidance(prompts, settings, size, original_size)
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
        return self.decode(latents), self._parameters(prompts, seeds, settings, (height, width))

    @property
    def init_image_encoder(self) -> InitImageEncoder:
        """The VAE side of img2img and inpainting: latents in the UNet's dtype, encoded in :attr:`vae_dtype`."""
        return InitImageEncoder(self.vae, self.vae_dtype, self.unet.dtype, self.vae_scale, self.device)

    @torch.no_grad()
    def img2img(
        self, init_image: Image.Image, prompts: list[str], seeds: list[int], settings: SampleSettings, strength: float
    ) -> tuple[list[Image.Image], list[GenerationParameters]]:
        """Re-draw ``init_image`` per prompt, from the timestep ``strength`` in (0, 1] of the way into the schedule
        (SDEdit: :func:`~trainer.sampling.image_to_image.img2img_start`)."""
        size, scheduler = self.image_size(settings), self._scheduler(settings)
        start = img2img_start(self.init_image_encoder, scheduler, init_image, size, seeds, settings.steps, strength)
        latents = self._denoise_from(scheduler, start, prompts, settings)
        return self.decode(latents), self._parameters(prompts, seeds, settings, size, strength, start.original_size)

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
        """Repaint the white part of ``mask_image`` (:func:`~trainer.sampling.image_to_image.inpaint_start`).

        Returns:
            ``(latents (B, C, h, w), init latents (B, C, h, w), mask (1, 1, h, w))``.
        """
        size, scheduler = self.image_size(settings), self._scheduler(settings)
        encoder, steps = self.init_image_encoder, settings.steps
        start = inpaint_start(
            encoder, scheduler, init_image, mask_image, size, seeds, steps, strength, self.inpainting_unet
        )
        return self._denoise_from(scheduler, start, prompts, settings), start.init, start.mask

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
        parameters = self._parameters(prompts, seeds, settings, size, strength, init_size(init_image))
        return self.decode(latents), parameters

    def _denoise_from(
        self, scheduler: SchedulerMixin, start: LoopStart, prompts: list[str], settings: SampleSettings
    ) -> torch.Tensor:
        """:meth:`_denoise` from an image's :class:`~trainer.sampling.image_to_image.LoopStart`."""
        return self._denoise(
            scheduler,
            start.latents,
            prompts,
            settings,
            start.timesteps,
            start.generators,
            after_step=start.after_step,
            conditioning=start.conditioning,
            original_size=start.original_size,
        )

    def _scheduler(self, settings: SampleSettings) -> SchedulerMixin:
        s = settings
        return sampling_scheduler(s.scheduler, self.scheduler_config, s.use_karras_sigmas, s.steps, self.device)
