"""SDXL's text conditioning: two CLIP text encoders, penultimate states concatenated, one pooled embedding.

Follows diffusers' ``StableDiffusionXLPipeline.encode_prompt`` (Podell et al., "SDXL: Improving
Latent Diffusion Models for High-Resolution Image Synthesis", 2023, section 2.1): each caption is
tokenized by both tokenizers (padded to their ``model_max_length``), each encoder's penultimate
hidden state is taken (``hidden_states[-2]``), the two are concatenated on channels, and the pooled,
projected output of the second encoder (a ``CLIPTextModelWithProjection``'s ``text_embeds``) is
the pooled embedding the UNet's ``text_time`` embedding takes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from data_pipelines.latents.text_encoding import TextEncoding, chunked_token_ids, token_id_states

SDXL_TEXT_OUTPUT = "penultimate+pooled"  # what the cache key records for SDXL shards


@torch.no_grad()
def encode_text_sdxl(
    tokenizers: Sequence[CLIPTokenizer],
    text_encoders: Sequence[CLIPTextModel | CLIPTextModelWithProjection],
    texts: list[str],
    texts_2: list[str] | None = None,
    encoding: TextEncoding | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Captions -> SDXL's ``(text, pooled)`` without gradients (precompute, sampling): see :func:`sdxl_text_states`."""
    return sdxl_text_states(tokenizers, text_encoders, texts, texts_2, encoding)


def sdxl_text_states(
    tokenizers: Sequence[CLIPTokenizer],
    text_encoders: Sequence[CLIPTextModel | CLIPTextModelWithProjection],
    texts: list[str],
    texts_2: list[str] | None = None,
    encoding: TextEncoding | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Captions -> SDXL's ``(text, pooled)``, with gradients where the encoders train (DreamBooth).

    Args:
        tokenizers: the two tokenizers (same ``model_max_length``).
        text_encoders: a ``CLIPTextModel`` and a ``CLIPTextModelWithProjection``.
        texts: ``B`` captions.
        texts_2: ``B`` captions for the second encoder (diffusers' ``prompt_2``); ``None``: ``texts``.
        encoding: long prompts (``max_token_length``; the pooled embedding is the first chunk's), as
            :func:`data_pipelines.latents.text_encoding.text_states`; ``clip_skip`` is refused for SDXL.

    Returns:
        ``text`` ``(B, T, D1 + D2)``: both penultimate hidden states, concatenated; ``pooled``
        ``(B, P)``: the second encoder's projected pooled output.
    """
    encoding = encoding or TextEncoding()
    per_encoder = [texts, texts if texts_2 is None else texts_2]
    ids = [chunked_token_ids(t, captions, encoding.chunks) for t, captions in zip(tokenizers, per_encoder, strict=True)]
    return encode_token_ids_sdxl(text_encoders, ids[0], ids[1], encoding)


def encode_token_ids_sdxl(
    text_encoders: Sequence[CLIPTextModel | CLIPTextModelWithProjection],
    ids: torch.Tensor,
    ids_2: torch.Tensor,
    encoding: TextEncoding | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SDXL's token ids -> ``(text, pooled)``, exactly what precompute stored for the same captions; with gradients
    where the encoders train (``lf-train model.train_text_encoder=true``).

    Args:
        text_encoders: a ``CLIPTextModel`` and a ``CLIPTextModelWithProjection``.
        ids, ids_2: ``(B, n, L)`` each, from the first and the second tokenizer
            (:func:`~data_pipelines.latents.text_encoding.chunked_token_ids`; the shards' ``token_ids``,
            ``token_ids_2``).
        encoding: long prompts (``n = encoding.chunks``); ``clip_skip`` is refused for SDXL.

    Returns:
        ``text`` ``(B, T, D1 + D2)``: both penultimate hidden states, concatenated; ``pooled`` ``(B, P)``: the
        second encoder's projected pooled output (its first chunk's).
    """
    if encoding is not None:
        encoding.check_sdxl(True)
    states, pooled = [], None
    for encoder, encoder_ids in zip(text_encoders, (ids, ids_2), strict=True):
        hidden, projected = token_id_states(encoder, encoder_ids, encoding, penultimate=True)
        states.append(hidden)  # (B, T, D_i)
        if isinstance(encoder, CLIPTextModelWithProjection):
            pooled = projected  # (B, P)
    if pooled is None:
        raise ValueError("SDXL's second text encoder must be a CLIPTextModelWithProjection (its pooled projection)")
    return torch.cat(states, dim=-1), pooled
