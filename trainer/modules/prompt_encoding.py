"""Prompts encoded in the training step, by text encoders that train (DreamBooth) or hold trained rows
(textual inversion): the conditioning the latent shards would hold, with gradients.

SD 1.x/2.x: the encoder's last hidden state of the prompt padded to ``model_max_length``, as
:func:`data_pipelines.latents.encoders.encode_text` (precompute's, without gradients) computes it; SDXL:
both penultimate states and the second encoder's pooled embedding
(:func:`data_pipelines.latents.sdxl_text.sdxl_text_states`). So the step conditions the UNet on what
precompute and the sampler compute.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from data_pipelines.latents.sdxl_text import sdxl_text_states


def encode_prompts_in_step(
    tokenizers: Sequence[CLIPTokenizer],
    text_encoders: Sequence[CLIPTextModel | CLIPTextModelWithProjection],
    prompts: list[str],
) -> dict[str, torch.Tensor]:
    """``B`` prompts -> ``{"text": (B, T, D)}``; SDXL (two encoders): ``D = D1 + D2`` and ``"pooled"`` ``(B, P)``."""
    if len(text_encoders) == 2:
        text, pooled = sdxl_text_states(tokenizers, text_encoders, prompts)
        return {"text": text, "pooled": pooled}
    tokenizer, encoder = tokenizers[0], text_encoders[0]
    ids = tokenizer(
        prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids
    return {"text": encoder(ids.to(next(encoder.parameters()).device)).last_hidden_state}
