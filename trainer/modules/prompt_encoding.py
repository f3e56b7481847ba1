"""Prompts encoded in the training step, by text encoders that train (DreamBooth) or hold trained rows
(textual inversion): the conditioning the latent shards would hold, with gradients.

One recipe with precompute and the sampler (:mod:`data_pipelines.latents.text_encoding`: long prompts in
chunks, ``clip_skip``): SD 1.x/2.x take the encoder's hidden state of the prompt; SDXL both penultimate
states and the second encoder's pooled embedding (:func:`data_pipelines.latents.sdxl_text.sdxl_text_states`).
So the step conditions the UNet on what precompute and the sampler compute.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from data_pipelines.latents.sdxl_text import sdxl_text_states
from data_pipelines.latents.text_encoding import TextEncoding, text_states


def encode_prompts_in_step(
    tokenizers: Sequence[CLIPTokenizer],
    text_encoders: Sequence[CLIPTextModel | CLIPTextModelWithProjection],
    prompts: list[str],
    encoding: TextEncoding | None = None,
) -> dict[str, torch.Tensor]:
    """``B`` prompts -> ``{"text": (B, T, D)}``; SDXL (two encoders): ``D = D1 + D2`` and ``"pooled"`` ``(B, P)``.

    Args:
        encoding: long prompts and ``clip_skip`` (default: 75 tokens, the last layer), as the latent shards'
            manifest or the module's config records them.
    """
    if len(text_encoders) == 2:
        text, pooled = sdxl_text_states(tokenizers, text_encoders, prompts, encoding=encoding)
        return {"text": text, "pooled": pooled}
    text, _ = text_states(tokenizers[0], text_encoders[0], prompts, encoding)
    return {"text": text}
