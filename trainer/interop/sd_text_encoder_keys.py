"""The text encoder's keys in an original SD single file <-> a transformers ``CLIPTextModel``'s.

SD 1.x files hold OpenAI's CLIP under ``cond_stage_model.transformer.text_model.*`` with Hugging
Face's names (a prefix change). SD 2.x files hold OpenCLIP's ViT-H text tower under
``cond_stage_model.model.*`` with OpenCLIP's names and fused q/k/v projections (``in_proj``); the
two OpenCLIP functions map in opposite directions with the same rename tables.

SDXL files hold the same two layouts under other prefixes: CLIP ViT-L under
``conditioner.embedders.0.transformer.text_model.*`` and OpenCLIP ViT-bigG under
``conditioner.embedders.1.model.*``, the latter with its pooled projection: OpenCLIP's
``text_projection`` ``(width, projection)`` is transformers' ``text_projection.weight``
``(projection, width)`` transposed (as diffusers' ``convert_open_clip_checkpoint`` reads it).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from trainer.interop.sd_single_file import NON_WEIGHT_KEYS, OPEN_CLIP_PREFIX, TEXT_PREFIX, KeyMapError, rename_parts


def text_to_original(state: Mapping[str, torch.Tensor], prefix: str = TEXT_PREFIX) -> dict[str, torch.Tensor]:
    """A transformers ``CLIPTextModel`` state dict -> ``prefix`` + its names (SD 1.x:
    ``cond_stage_model.transformer.text_model.*``; SDXL's first encoder: ``SDXL_TEXT_PREFIX``)."""
    return {prefix + key.removeprefix("text_model."): tensor for key, tensor in state.items()}


def text_to_diffusers(state: Mapping[str, torch.Tensor], prefix: str = TEXT_PREFIX) -> dict[str, torch.Tensor]:
    """The keys under ``prefix`` (see :func:`text_to_original`) -> a ``CLIPTextModel`` state dict."""
    return {
        key[len(prefix) :]: tensor
        for key, tensor in state.items()
        if key.startswith(prefix) and key not in NON_WEIGHT_KEYS
    }


# CLIPEncoderLayer (transformers) -> ResidualAttentionBlock (OpenCLIP); q/k/v are fused into in_proj.
OPEN_CLIP_LAYER_RENAMES = {
    "layer_norm1.": "ln_1.",
    "layer_norm2.": "ln_2.",
    "mlp.fc1.": "mlp.c_fc.",
    "mlp.fc2.": "mlp.c_proj.",
    "self_attn.out_proj.": "attn.out_proj.",
}
OPEN_CLIP_TOP = {
    "embeddings.token_embedding.weight": "token_embedding.weight",
    "embeddings.position_embedding.weight": "positional_embedding",
    "final_layer_norm.weight": "ln_final.weight",
    "final_layer_norm.bias": "ln_final.bias",
}
# OpenCLIP parts SD 2.x does not use: the projection and temperature of contrastive training.
OPEN_CLIP_UNUSED = ("text_projection", "logit_scale")
PROJECTION = "text_projection.weight"  # CLIPTextModelWithProjection's (projection, width); OpenCLIP's transposed
OPEN_CLIP_PROJECTION = "text_projection"


def text_to_open_clip(state: Mapping[str, torch.Tensor], prefix: str = OPEN_CLIP_PREFIX) -> dict[str, torch.Tensor]:
    """A ``CLIPTextModel`` (or ``CLIPTextModelWithProjection``) state dict -> OpenCLIP names under ``prefix``
    (SD 2.x: ``cond_stage_model.model.*``; SDXL's second encoder: ``SDXL_OPEN_CLIP_PREFIX``).

    Raises:
        KeyMapError: keys with no OpenCLIP counterpart (named).
    """
    state = {key.removeprefix("text_model."): tensor for key, tensor in state.items()}
    out, unmapped, layers = {}, [], set()
    for key, tensor in state.items():
        if key == PROJECTION:
            out[prefix + OPEN_CLIP_PROJECTION] = tensor.T.contiguous()  # (P, W) -> (W, P)
        elif key in OPEN_CLIP_TOP:
            out[prefix + OPEN_CLIP_TOP[key]] = tensor
        elif key.startswith("encoder.layers."):
            index, rest = key[len("encoder.layers.") :].split(".", 1)
            layers.add(int(index))
            if rest.split(".")[1] in ("q_proj", "k_proj", "v_proj"):
                continue  # fused below
            renamed = rename_parts(rest, OPEN_CLIP_LAYER_RENAMES)
            if renamed == rest:
                unmapped.append(key)
            out[f"{prefix}transformer.resblocks.{index}.{renamed}"] = tensor
        else:
            unmapped.append(key)
    if unmapped:
        raise KeyMapError(f"no rule maps these text encoder keys to OpenCLIP's layout: {sorted(unmapped)}")
    for index in sorted(layers):
        for kind in ("weight", "bias"):
            parts = [state[f"encoder.layers.{index}.self_attn.{x}_proj.{kind}"] for x in "qkv"]
            out[f"{prefix}transformer.resblocks.{index}.attn.in_proj_{kind}"] = torch.cat(parts)  # (3D, ...)
    return out


def open_clip_to_text(state: Mapping[str, torch.Tensor], prefix: str = OPEN_CLIP_PREFIX) -> dict[str, torch.Tensor]:
    """The OpenCLIP keys under ``prefix`` -> a ``CLIPTextModel`` state dict (with ``text_projection.weight``
    when the file holds the projection: a ``CLIPTextModelWithProjection``'s).

    Raises:
        KeyMapError: keys under the prefix that no rule maps (named).
    """
    top = {new: old for old, new in OPEN_CLIP_TOP.items()}
    layer_renames = {new: old for old, new in OPEN_CLIP_LAYER_RENAMES.items()}
    out, unmapped = {}, []
    for key, tensor in state.items():
        if not key.startswith(prefix) or key in NON_WEIGHT_KEYS:
            continue
        local = key[len(prefix) :]
        if local == OPEN_CLIP_PROJECTION:
            out[PROJECTION] = tensor.T.contiguous()  # (W, P) -> (P, W)
        elif local in top:
            out[top[local]] = tensor
        elif local.startswith("transformer.resblocks."):
            index, rest = local[len("transformer.resblocks.") :].split(".", 1)
            if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
                kind = rest.rsplit("_", 1)[1]
                for name, chunk in zip("qkv", tensor.chunk(3), strict=True):  # (3D, ...) -> 3 x (D, ...)
                    out[f"encoder.layers.{index}.self_attn.{name}_proj.{kind}"] = chunk.contiguous()
                continue
            renamed = rename_parts(rest, layer_renames)
            if renamed == rest:
                unmapped.append(key)
            out[f"encoder.layers.{index}.{renamed}"] = tensor
        else:
            unmapped.append(key)
    if unmapped:
        raise KeyMapError(f"no rule maps these OpenCLIP keys: {sorted(unmapped)}")
    return out
