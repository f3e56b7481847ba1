"""What the sampler's UNet is conditioned on besides the latents: prompts, the negative prompt, SDXL's extras.

Made as diffusers' pipelines' ``encode_prompt`` make them, so that a seed gives their image:

- SD 1.x/2.x: the text encoder's last hidden state; no negative prompt encodes ``""``.
- SDXL (Podell et al. 2023, sections 2.1-2.2): both encoders' penultimate states and the pooled
  embedding (:func:`data_pipelines.latents.sdxl_text.encode_text_sdxl`, precompute's own); *no*
  negative prompt (``None``) gives zeros when the pipeline's ``force_zeros_for_empty_prompt`` is set
  (SDXL base's default, and what caption dropout trained), while an explicit ``""`` is encoded like
  any other text; and time_ids of original size, crop top-left and target size per image. A base
  model's img2img and inpainting pipelines have ``requires_aesthetics_score`` false, so they pass
  the same six time_ids and no aesthetic score; the refiner's five (with an aesthetic score) are out
  of scope.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from data_pipelines.latents.encoders import encode_text
from data_pipelines.latents.sdxl_text import encode_text_sdxl
from lf_common.errors import ConfigError


@torch.no_grad()
def encode_prompts(
    tokenizers: Sequence[CLIPTokenizer],
    text_encoders: Sequence[CLIPTextModel | CLIPTextModelWithProjection],
    prompts: list[str],
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``B`` prompts -> ``(text (B, T, D), pooled (B, P))`` as precompute made them; ``pooled`` only for SDXL
    (two tokenizers and encoders), else ``None``."""
    if len(text_encoders) == 1:
        return encode_text(tokenizers[0], text_encoders[0], prompts), None
    return encode_text_sdxl(tokenizers, text_encoders, prompts)


@torch.no_grad()
def encode_negative_prompt(
    tokenizers: Sequence[CLIPTokenizer],
    text_encoders: Sequence[CLIPTextModel | CLIPTextModelWithProjection],
    negative_prompt: str | None,
    batch: int,
    force_zeros_for_empty_prompt: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The negative prompt's ``(text (B, T, D), pooled (B, P) or None)`` for a batch of ``batch``.

    ``None`` means none was given: zeros for SDXL with ``force_zeros_for_empty_prompt``, else the
    encoding of ``""``. A string, ``""`` included, is encoded (diffusers' ``encode_prompt``).
    """
    text, pooled = encode_prompts(tokenizers, text_encoders, [negative_prompt or ""] * batch)
    if negative_prompt is None and pooled is not None and force_zeros_for_empty_prompt:
        return torch.zeros_like(text), torch.zeros_like(pooled)
    return text, pooled


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
