"""A small CLIP text encoder from a config, saved in diffusers layout with the real CLIP tokenizer.

It stands in for SD's pretrained text encoder where none can be downloaded (the demo and the
tests). Its weights are random but frozen and seeded, so each caption gets its own, reproducible
embedding for the UNet to condition on.

One departure from CLIP's initialisation: the token embeddings are drawn at unit scale
(``token_embedding_std=1``) instead of CLIP's 0.02. At 0.02 the randomly initialised attention and
MLP layers swamp the token identities, and captions that differ in one word ("... digit eight",
"... digit nine") come out almost equal (relative distance about 0.1); at unit scale each word
dominates its position, as in a trained encoder, and they are 3-4 times further apart. Measured
on the digits demo: conditional accuracy 0.25 vs 0.96 after 600 UNet steps.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import CLIPTextConfig, CLIPTextModel

from data_pipelines.latents.tokenizer import CLIP_MAX_LENGTH, CLIP_VOCAB_SIZE, save_clip_tokenizer
from lf_common.atomic import atomic_path


def save_tiny_text_encoder(
    out_dir: str | Path,
    hidden_size: int = 32,
    num_layers: int = 2,
    num_heads: int = 4,
    intermediate_size: int = 64,
    max_length: int = CLIP_MAX_LENGTH,
    token_embedding_std: float = 1.0,
    seed: int = 0,
) -> Path:
    """Write ``out_dir/text_encoder`` (a seeded ``CLIPTextModel``) and ``out_dir/tokenizer``.

    Args:
        max_length: the context length: position embeddings of the model and the tokenizer's
            ``model_max_length`` (every caption is padded to it, by us and by diffusers).
        token_embedding_std: standard deviation of the token embeddings (see the module docstring).

    Returns:
        ``out_dir``.
    """
    out = Path(out_dir)
    config = CLIPTextConfig(
        vocab_size=CLIP_VOCAB_SIZE,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        max_position_embeddings=max_length,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )
    torch.manual_seed(seed)
    model = CLIPTextModel(config)
    with torch.no_grad():
        model.get_input_embeddings().weight.normal_(0.0, token_embedding_std)
    with atomic_path(out / "text_encoder") as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
    with atomic_path(out / "tokenizer") as tmp:
        save_clip_tokenizer(tmp, max_length=max_length)
    return out
