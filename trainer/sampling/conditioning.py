"""What the sampler's UNet is conditioned on besides the latents: prompts, the negative prompt, SDXL's extras.

Made as diffusers' pipelines' ``encode_prompt`` make them, so that a seed gives their image:

- SD 1.x/2.x: the text encoder's last hidden state (or, with ``clip_skip``, an earlier layer's); no negative
  prompt encodes ``""``. Long prompts (``max_token_length`` 150/225) and ``clip_skip`` are encoded exactly as
  precompute encoded the training captions (:mod:`data_pipelines.latents.text_encoding`, the one recipe), with
  the settings the export's latent manifest records.
- SDXL (Podell et al. 2023, sections 2.1-2.2): both encoders' penultimate states and the pooled
  embedding (:func:`data_pipelines.latents.sdxl_text.encode_text_sdxl`, precompute's own); the second
  encoder reads ``prompt_2`` / ``negative_prompt_2`` when given (else the same text as the first, as
  diffusers' ``prompt_2 or prompt``); *no* negative prompt (``None``) gives zeros when the pipeline's
  ``force_zeros_for_empty_prompt`` is set (SDXL base's default, and what caption dropout trained),
  while an explicit ``""`` is encoded like any other text; and time_ids of original size, crop
  top-left and target size per image. A base model's img2img and inpainting pipelines have
  ``requires_aesthetics_score`` false, so they pass the same six time_ids and no aesthetic score; the
  refiner's five (with an aesthetic score) are out of scope.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from data_pipelines.latents.encoders import encode_text
from data_pipelines.latents.sdxl_text import encode_text_sdxl
from data_pipelines.latents.text_encoding import TextEncoding
from lf_common.errors import ConfigError
from trainer.interop.embedding_files import expand_prompt
from trainer.sampling.denoise import SDXLConditioning
from trainer.sampling.settings import SampleSettings

TextEncoder = CLIPTextModel | CLIPTextModelWithProjection


@torch.no_grad()
def encode_prompts(
    tokenizers: Sequence[CLIPTokenizer],
    text_encoders: Sequence[TextEncoder],
    prompts: list[str],
    prompts_2: list[str] | None = None,
    encoding: TextEncoding | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``B`` prompts -> ``(text (B, T, D), pooled (B, P))`` as precompute made them; ``pooled`` only for SDXL
    (two tokenizers and encoders), else ``None``. ``prompts_2``: the second encoder's texts (SDXL only);
    ``encoding``: long prompts and ``clip_skip`` (default: 75 tokens, the last layer). A textual-inversion token
    of several vectors (``lf-sample embeddings=``) is expanded to its vector tokens, as diffusers'
    ``maybe_convert_prompt`` does."""
    prompts = [expand_prompt(p, tokenizers[0]) for p in prompts]
    prompts_2 = [expand_prompt(p, tokenizers[-1]) for p in prompts_2] if prompts_2 is not None else None
    if len(text_encoders) == 1:
        if prompts_2 is not None:
            raise ConfigError("prompt_2 and negative_prompt_2 are for SDXL's second text encoder; this model has one")
        return encode_text(tokenizers[0], text_encoders[0], prompts, encoding), None
    return encode_text_sdxl(tokenizers, text_encoders, prompts, prompts_2, encoding)


@torch.no_grad()
def encode_negative_prompt(
    tokenizers: Sequence[CLIPTokenizer],
    text_encoders: Sequence[TextEncoder],
    negative_prompt: str | None,
    batch: int,
    force_zeros_for_empty_prompt: bool = True,
    negative_prompt_2: str | None = None,
    encoding: TextEncoding | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The negative prompt's ``(text (B, T, D), pooled (B, P) or None)`` for a batch of ``batch``.

    ``None`` means none was given: zeros for SDXL with ``force_zeros_for_empty_prompt``, else the
    encoding of ``""``. A string, ``""`` included, is encoded (diffusers' ``encode_prompt``); the second
    encoder reads ``negative_prompt_2 or negative_prompt`` (SDXL).

    Raises:
        ConfigError: ``negative_prompt_2`` where the negative conditioning is zeros (diffusers would drop it).
    """
    zeros = negative_prompt is None and len(text_encoders) == 2 and force_zeros_for_empty_prompt
    if zeros and negative_prompt_2 is not None:
        raise ConfigError(
            "negative_prompt_2 without negative_prompt: this SDXL model's negative conditioning is then zeros "
            "(force_zeros_for_empty_prompt); set negative_prompt too (negative_prompt='' encodes the empty text)"
        )
    texts = [negative_prompt or ""] * batch
    texts_2 = [negative_prompt_2 or negative_prompt or ""] * batch if negative_prompt_2 is not None else None
    text, pooled = encode_prompts(tokenizers, text_encoders, texts, texts_2, encoding)
    if zeros and pooled is not None:
        return torch.zeros_like(text), torch.zeros_like(pooled)
    return text, pooled


@dataclass
class PromptEncoder:
    """The text side of a sampler: its tokenizers and text encoders (one, or SDXL's two), in the UNet's dtype.

    Attributes:
        tokenizers, text_encoders: one of each (SD 1.x/2.x) or two (SDXL: CLIP ViT-L, OpenCLIP bigG).
        dtype: the UNet's dtype; the embeddings are cast to it.
        force_zeros_for_empty_prompt: SDXL: zeros when no negative prompt is given (the pipeline's flag).
        encoding: long prompts and ``clip_skip``, as the training captions were encoded (None: the defaults).
    """

    tokenizers: Sequence[CLIPTokenizer]
    text_encoders: Sequence[TextEncoder]
    dtype: torch.dtype
    force_zeros_for_empty_prompt: bool = True
    encoding: TextEncoding | None = None

    @property
    def sdxl(self) -> bool:
        return len(self.text_encoders) == 2

    def encode(self, prompts: list[str], prompt_2: str | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Prompts -> ``(text (B, T, D), pooled (B, P) or None)``; ``prompt_2`` (SDXL): the second encoder's text
        for every prompt (``None`` or ``""``: each prompt itself, as diffusers' ``prompt_2 or prompt``)."""
        prompts_2 = [prompt_2] * len(prompts) if prompt_2 else None
        text, pooled = encode_prompts(self.tokenizers, self.text_encoders, prompts, prompts_2, self.encoding)
        return text.to(self.dtype), pooled.to(self.dtype) if pooled is not None else None

    def negative(
        self, negative_prompt: str | None, batch: int, negative_prompt_2: str | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The negative prompt's ``(text (B, T, D), pooled (B, P) or None)`` (:func:`encode_negative_prompt`)."""
        text, pooled = encode_negative_prompt(
            self.tokenizers,
            self.text_encoders,
            negative_prompt,
            batch,
            self.force_zeros_for_empty_prompt,
            negative_prompt_2,
            self.encoding,
        )
        return text.to(self.dtype), pooled.to(self.dtype) if pooled is not None else None

    def guidance(
        self,
        prompts: list[str],
        settings: SampleSettings,
        image_size: tuple[int, int],
        original_size: tuple[int, int] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, SDXLConditioning | None]:
        """Everything the denoising loop conditions on for a batch of ``B`` prompts.

        Args:
            prompts: ``B`` prompts.
            settings: the negative prompt(s), ``prompt_2`` and SDXL's size/crop inputs.
            image_size: the output's ``(height, width)`` in pixels (SDXL's target size).
            original_size: SDXL's original size when ``settings`` gives none (default: ``image_size``);
                img2img and inpainting pass the init image's ``(h, w)``.

        Returns:
            ``(cond (B, T, D), uncond (B, T, D), sdxl)``: ``sdxl`` holds the pooled embeddings and time_ids
            ``(B, 6)`` of an SDXL model, else ``None``.

        Raises:
            ConfigError: SDXL-only inputs (size/crop, second prompts) for a model that is not SDXL.
        """
        if not self.sdxl and (settings.micro_conditioning or settings.second_prompts):
            micro = settings.micro_conditioning
            what = "original_size and crop_top_left" if micro else "prompt_2 and negative_prompt_2"
            raise ConfigError(f"{what} condition SDXL models only; this model is not one")
        cond, pooled = self.encode(prompts, settings.prompt_2)
        uncond, uncond_pooled = self.negative(settings.negative_prompt, len(prompts), settings.negative_prompt_2)
        if pooled is None or uncond_pooled is None:
            return cond, uncond, None
        original = settings.original_size or original_size
        ids = sdxl_time_ids(image_size, len(prompts), original, settings.crop_top_left)  # (B, 6)
        return cond, uncond, SDXLConditioning(pooled, uncond_pooled, ids.to(cond.device, cond.dtype))


def sdxl_time_ids(
    target_size: tuple[int, int],
    batch: int,
    original_size: tuple[int, int] | None = None,
    crop_top_left: tuple[int, int] = (0, 0),
) -> torch.Tensor:
    """SDXL's micro-conditioning ``(B, 6)``: original ``(h, w)``, crop ``(top, left)``, target ``(h, w)``.

    The original size defaults to the target size, as in diffusers' SDXL pipelines.
    """
    ids = [*(original_size or target_size), *crop_top_left, *target_size]
    return torch.tensor([ids], dtype=torch.float32).expand(batch, 6)


def micro_conditioning(
    original_size: Sequence[int] | None, crop_top_left: Sequence[int] | None
) -> dict[str, tuple[int, int] | None]:
    """``SampleSettings``' ``original_size`` ``(h, w)`` and ``crop_top_left`` ``(top, left)`` from a config's lists.

    Raises:
        ConfigError: a value that is not two integers.
    """
    crop_top_left = crop_top_left or (0, 0)
    for key, value in (("original_size", original_size), ("crop_top_left", crop_top_left)):
        if value is not None and (len(value) != 2 or not all(isinstance(v, int) for v in value)):
            raise ConfigError(f"{key}={list(value)}: expected two integers, [height, width] or [top, left]")
    original = (int(original_size[0]), int(original_size[1])) if original_size else None
    return {"original_size": original, "crop_top_left": (int(crop_top_left[0]), int(crop_top_left[1]))}
