"""The diffusers configs of a single file's parts: its type's standard configs, with the sizes its shapes give.

Shapes give the sizes: block widths and counts, layers per block, transformer depth, linear or
convolutional projections, cross-attention width, channels, the text encoder's width, depth,
vocabulary and context length. They do not give what has no weight: attention heads, group-norm
groups, activations, the noise schedule, the image size. Those come from the type's standard
configs (``conf/base_models/<type>/``), scaled where they depend on a width the way the reference
model defines them: SD 1.x's UNet has 8 heads per attention, SD 2.x's heads of 64 channels, CLIP and
OpenCLIP heads of 64 channels; SDXL's UNet heads of 64 channels too, and its added embedding's
time width follows from ``label_emb`` and the pooled projection. A full-size file thus gets exactly the standard configs
(``tests/unit/test_model_types.py``); a smaller one the same architecture at its sizes, noted.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch

from trainer.interop.model_types import ModelType
from trainer.interop.sd_single_file import (
    OPEN_CLIP_PREFIX,
    SDXL_OPEN_CLIP_PREFIX,
    SDXL_TEXT_PREFIX,
    TEXT_PREFIX,
    UNET_PREFIX,
    VAE_PREFIX,
    KeyMapError,
)

Configs = dict[str, dict[str, Any]]
# diffusers' defaults for what the reference configs leave out
UNET_DEFAULTS = {"mid_block_type": "UNetMidBlock2DCrossAttn", "use_linear_projection": False}


def _indices(state: Mapping[str, torch.Tensor], prefix: str) -> list[int]:
    """The sorted numbers ``N`` of the keys ``prefix + "N." + ...``."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    return sorted({int(m.group(1)) for key in state if (m := pattern.match(key))})


def _shape(state: Mapping[str, torch.Tensor], key: str, source: str) -> tuple[int, ...]:
    if key not in state:
        raise KeyMapError(f"{source}: {key} is missing; the file's sizes cannot be read without it")
    return tuple(state[key].shape)


def _uniform(values: list[Any], what: str, source: str) -> Any:
    if len(set(map(str, values))) != 1:
        raise KeyMapError(f"{source}: {what} differ within one block ({values}); not a Stable Diffusion UNet")
    return values[0]


def _one_or_list(values: list[int]) -> int | list[int]:
    return values[0] if len(set(values)) == 1 else values


def unet_sizes(state: Mapping[str, torch.Tensor], source: str) -> dict[str, Any]:
    """The UNet's sizes from ldm's ``model.diffusion_model.*`` keys.

    ldm numbers the encoder ``input_blocks.0`` (``conv_in``), then per level its resnets (each with
    an optional transformer in slot 1) and a downsampler (``.0.op``) between levels; the decoder
    ``output_blocks`` hold ``layers + 1`` resnets per level.
    """
    p = UNET_PREFIX
    width, in_channels = _shape(state, p + "input_blocks.0.0.weight", source)[:2]
    levels: list[list[tuple[int, int]]] = [[]]  # per level: (resnet out channels, transformer depth)
    for i in _indices(state, p + "input_blocks.")[1:]:
        if p + f"input_blocks.{i}.0.op.weight" in state:
            levels.append([])
            continue
        out = _shape(state, p + f"input_blocks.{i}.0.out_layers.3.weight", source)[0]
        levels[-1].append((out, len(_indices(state, p + f"input_blocks.{i}.1.transformer_blocks."))))
    if not all(levels):
        raise KeyMapError(f"{source}: a UNet level without resnets (input_blocks); not a Stable Diffusion UNet")
    depths = [_uniform([d for _, d in level], "transformer depths", source) for level in levels]
    channels = [_uniform([c for c, _ in level], "resnet widths", source) for level in levels]
    layers = [len(level) for level in levels]
    up_attention, index = [], 0
    for level_layers in reversed(layers):
        slots = range(index, index + level_layers + 1)
        attention = [p + f"output_blocks.{k}.1.proj_in.weight" in state for k in slots]
        up_attention.append(_uniform(attention, "up attentions", source))
        index += level_layers + 1
    if p + "middle_block.1.proj_in.weight" not in state:
        raise KeyMapError(f"{source}: the UNet's middle block has no transformer (middle_block.1); not an SD UNet")
    projections = [tensor for key, tensor in state.items() if key.startswith(p) and key.endswith(".proj_in.weight")]
    cross = [tensor for key, tensor in state.items() if key.startswith(p) and key.endswith(".attn2.to_k.weight")]
    time_embed = _shape(state, p + "time_embed.0.weight", source)
    if time_embed != (4 * width, width):
        raise KeyMapError(f"{source}: {p}time_embed.0.weight is {time_embed}, expected {(4 * width, width)}")
    attention_depths = [d for d in depths if d] + ([len(_indices(state, p + "middle_block.1.transformer_blocks."))])
    sizes = {
        "in_channels": in_channels,
        "out_channels": _shape(state, p + "out.2.weight", source)[0],
        "block_out_channels": channels,
        "layers_per_block": _one_or_list(layers),
        "down_block_types": ["CrossAttnDownBlock2D" if d else "DownBlock2D" for d in depths],
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in up_attention],
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "cross_attention_dim": int(cross[0].shape[1]),
        "use_linear_projection": projections[0].ndim == 2,
    }
    if set(attention_depths) != {1}:
        sizes["transformer_layers_per_block"] = [d or 1 for d in depths]
    if p + "label_emb.0.0.weight" in state:  # SDXL's added embedding (pooled text + time_ids): (4 * width, in)
        sizes["projection_class_embeddings_input_dim"] = _shape(state, p + "label_emb.0.0.weight", source)[1]
    return sizes


def vae_sizes(state: Mapping[str, torch.Tensor], source: str) -> dict[str, Any]:
    """The VAE's sizes from ldm's ``first_stage_model.*`` keys."""
    p = VAE_PREFIX
    levels = _indices(state, p + "encoder.down.")
    if not levels:
        raise KeyMapError(f"{source}: no {p}encoder.down.* keys; the file holds no ldm VAE")
    layers = len(_indices(state, p + "encoder.down.0.block."))
    channels = [_shape(state, p + f"encoder.down.{i}.block.{layers - 1}.conv2.weight", source)[0] for i in levels]
    return {
        "in_channels": _shape(state, p + "encoder.conv_in.weight", source)[1],
        "out_channels": _shape(state, p + "decoder.conv_out.weight", source)[0],
        "latent_channels": _shape(state, p + "post_quant_conv.weight", source)[0],
        "block_out_channels": channels,
        "layers_per_block": layers,
        "down_block_types": ["DownEncoderBlock2D"] * len(levels),
        "up_block_types": ["UpDecoderBlock2D"] * len(levels),
    }


def text_encoder_sizes(
    state: Mapping[str, torch.Tensor], kind: str, source: str, prefix: str | None = None
) -> dict[str, Any]:
    """The text encoder's sizes from CLIP (``kind="clip"``, keys under ``prefix``, by default
    ``cond_stage_model.transformer.text_model.``) or OpenCLIP keys (``"open_clip"``, by default
    ``cond_stage_model.model.``; with ``text_projection`` ``(width, projection)``: its ``projection_dim``)."""
    if kind == "clip":
        p = prefix or TEXT_PREFIX
        vocab, width = _shape(state, p + "embeddings.token_embedding.weight", source)
        positions = _shape(state, p + "embeddings.position_embedding.weight", source)[0]
        layers = _indices(state, p + "encoder.layers.")
        inner = _shape(state, p + "encoder.layers.0.mlp.fc1.weight", source)[0]
    else:
        p = prefix or OPEN_CLIP_PREFIX
        vocab, width = _shape(state, p + "token_embedding.weight", source)
        positions = _shape(state, p + "positional_embedding", source)[0]
        layers = _indices(state, p + "transformer.resblocks.")
        inner = _shape(state, p + "transformer.resblocks.0.mlp.c_fc.weight", source)[0]
    projection = {"projection_dim": state[p + "text_projection"].shape[1]} if p + "text_projection" in state else {}
    return projection | {
        "vocab_size": vocab,
        "hidden_size": width,
        "max_position_embeddings": positions,
        "num_hidden_layers": len(layers),
        "intermediate_size": inner,
    }


def _heads(width: int, head_width: int, where: str, source: str) -> int:
    if width % head_width:
        raise KeyMapError(f"{source}: {where} is {width} wide, not a multiple of the standard {head_width}-wide heads")
    return width // head_width


def _check_groups(channels: list[int], groups: int, part: str, source: str) -> None:
    if bad := [c for c in channels if c % groups]:
        raise KeyMapError(
            f"{source}: {part} widths {bad} do not divide into the standard {groups} norm groups; "
            "not a Stable Diffusion architecture (pass config_dir=FOLDER with its configs)"
        )


def scaled_configs(state: Mapping[str, torch.Tensor], model_type: ModelType, source: str) -> Configs:
    """The configs of ``model_type`` with the sizes of ``state`` (see the module docstring).

    Raises:
        KeyMapError: a size that is missing or does not fit the type's architecture (named).
    """
    configs = model_type.configs()
    unet, vae, text = configs["unet"], configs["vae"], configs["text_encoder"]
    standard_heads = unet["attention_head_dim"]
    unet.update({k: v for k, v in unet_sizes(state, source).items() if unet.get(k, UNET_DEFAULTS.get(k)) != v})
    _check_groups(unet["block_out_channels"], unet["norm_num_groups"], "UNet", source)
    if isinstance(standard_heads, list):  # SD 2.x: heads of a fixed width (diffusers calls the count "head dim")
        head_width = configs_width(model_type) // standard_heads[0]
        unet["attention_head_dim"] = [_heads(c, head_width, "a UNet block", source) for c in unet["block_out_channels"]]
    elif any(c % standard_heads for c in unet["block_out_channels"]):
        widths = unet["block_out_channels"]
        raise KeyMapError(f"{source}: UNet widths {widths} do not split into the standard {standard_heads} heads")
    vae.update(vae_sizes(state, source))
    _check_groups(vae["block_out_channels"], vae["norm_num_groups"], "VAE", source)
    encoders = {"text_encoder": (model_type.text_encoder, None)}
    if model_type.text_encoder == "sdxl":
        encoders = {"text_encoder": ("clip", SDXL_TEXT_PREFIX), "text_encoder_2": ("open_clip", SDXL_OPEN_CLIP_PREFIX)}
    for part, (kind, prefix) in encoders.items():
        text = configs[part]
        head_width = text["hidden_size"] // text["num_attention_heads"]
        text.update(text_encoder_sizes(state, kind, source, prefix))
        text["num_attention_heads"] = _heads(text["hidden_size"], head_width, f"the {part}", source)
        configs[part.replace("text_encoder", "tokenizer")]["model_max_length"] = text["max_position_embeddings"]
    if "projection_class_embeddings_input_dim" in unet:  # SDXL: pooled projection + 6 time_ids x time width
        unet["addition_time_embed_dim"] = _time_width(unet, configs["text_encoder_2"]["projection_dim"], source)
    return configs


def _time_width(unet: dict[str, Any], pooled: int, source: str) -> int:
    """SDXL's ``addition_time_embed_dim``: ``label_emb`` takes the pooled embedding and six time_ids' embeddings."""
    time_inputs = int(unet["projection_class_embeddings_input_dim"]) - pooled
    if time_inputs <= 0 or time_inputs % 6:
        raise KeyMapError(
            f"{source}: {UNET_PREFIX}label_emb.0.0.weight takes {unet['projection_class_embeddings_input_dim']} "
            f"inputs, expected the pooled embedding ({pooled}) and 6 size/crop time_ids of equal width"
        )
    return time_inputs // 6


def configs_width(model_type: ModelType) -> int:
    """The standard UNet's first block width (320 for SD 1.x/2.x)."""
    return int(model_type.configs()["unet"]["block_out_channels"][0])


def differences(configs: Configs, model_type: ModelType) -> list[str]:
    """``part.key=value`` for every setting that differs from the type's standard configs."""
    standard = model_type.configs()
    return [
        f"{part}.{key}={value}"
        for part, config in configs.items()
        for key, value in config.items()
        if standard[part].get(key) != value
    ]
