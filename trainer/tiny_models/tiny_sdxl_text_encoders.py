"""SDXL's two text encoders, tiny, from configs: saved in diffusers' SDXL layout with the real CLIP tokenizer.

SDXL conditions on CLIP ViT-L (a ``CLIPTextModel``, 768 wide) and OpenCLIP ViT-bigG (a
``CLIPTextModelWithProjection``, 1280 wide, with a 1280-dimensional pooled projection). The tiny pair
keeps that shape at small widths: ``text_encoder/`` and ``tokenizer/`` are the SD 1.x tiny encoder
(:mod:`trainer.tiny_models.tiny_text_encoder`, 32 wide), ``text_encoder_2/`` a second, differently
seeded encoder with a projection, and ``tokenizer_2/`` pads with ``!`` as SDXL's second tokenizer does.
A UNet conditioned on them takes ``cross_attention_dim = hidden_size + hidden_size_2`` and a pooled
embedding of ``projection_dim`` (see ``conf/model/sdxl_tiny.yaml``).
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import CLIPTextConfig, CLIPTextModelWithProjection

from data_pipelines.latents.tokenizer import CLIP_MAX_LENGTH, CLIP_VOCAB_SIZE, save_clip_tokenizer
from lf_common.atomic import atomic_path
from trainer.tiny_models.tiny_text_encoder import save_tiny_text_encoder

SDXL_PAD_TOKEN_2 = "!"  # SDXL's second tokenizer pads with "!" (id 0), the first with the end token


def save_tiny_sdxl_text_encoders(
    out_dir: str | Path,
    hidden_size: int = 32,
    hidden_size_2: int = 32,
    projection_dim: int = 32,
    num_layers: int = 2,
    num_heads: int = 4,
    intermediate_size: int = 64,
    max_length: int = CLIP_MAX_LENGTH,
    token_embedding_std: float = 1.0,
    seed: int = 0,
) -> Path:
    """Write ``text_encoder/``, ``tokenizer/``, ``text_encoder_2/`` and ``tokenizer_2/`` into ``out_dir``.

    Args:
        hidden_size: width of the first encoder (``CLIPTextModel``).
        hidden_size_2: width of the second (``CLIPTextModelWithProjection``).
        projection_dim: the second encoder's pooled projection (``text_embeds`` ``(B, projection_dim)``).
        intermediate_size: both encoders' MLP width.
        max_length: both tokenizers' context length (SDXL concatenates the two states per token).
        token_embedding_std: token embedding scale (see :mod:`trainer.tiny_models.tiny_text_encoder`).

    Returns:
        ``out_dir``.
    """
    out = Path(out_dir)
    save_tiny_text_encoder(
        out, hidden_size, num_layers, num_heads, intermediate_size, max_length, token_embedding_std, seed
    )
    config = CLIPTextConfig(
        vocab_size=CLIP_VOCAB_SIZE,
        hidden_size=hidden_size_2,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        max_position_embeddings=max_length,
        projection_dim=projection_dim,
        hidden_act="gelu",  # OpenCLIP's activation (SDXL's bigG), where CLIP ViT-L has quick_gelu
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )
    torch.manual_seed(seed + 1)
    model = CLIPTextModelWithProjection(config)
    with torch.no_grad():
        model.get_input_embeddings().weight.normal_(0.0, token_embedding_std)
    with atomic_path(out / "text_encoder_2") as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
    with atomic_path(out / "tokenizer_2") as tmp:
        save_clip_tokenizer(tmp, max_length=max_length, pad_token=SDXL_PAD_TOKEN_2)
    return out
