"""Small random Stable Diffusion models of each type, and their single files in the layouts that circulate.

A small model keeps its type's standard configs (``conf/base_models/<type>/``) and changes only sizes
(widths, depths, context length), so a file of it imports without configs exactly as a full-size
one does: the importer reads the sizes from the shapes and the rest from the same standard configs.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from trainer.interop.model_types import BY_NAME
from trainer.interop.pipeline_weights import PipelineParts, original_state_dict

# Sizes only; the heads follow each type's rule (SD 1.x: 8 per attention; SD 2.x and the text encoders: 64 wide).
UNET_SIZES = {
    "sd1": dict(block_out_channels=[32, 64], cross_attention_dim=64, attention_head_dim=8),
    "sd2": dict(block_out_channels=[64, 128], cross_attention_dim=64, attention_head_dim=[1, 2]),
}
COMMON_UNET = dict(
    layers_per_block=1,
    down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
)
VAE_SIZES = dict(block_out_channels=[32, 64], layers_per_block=1, down_block_types=["DownEncoderBlock2D"] * 2,
                 up_block_types=["UpDecoderBlock2D"] * 2)  # fmt: skip
TEXT_SIZES = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=1, max_position_embeddings=16
)


def small_configs(model_type: str) -> dict[str, dict[str, Any]]:
    """The standard configs of ``model_type`` at small sizes."""
    configs = BY_NAME[model_type].configs()
    family = "sd2" if model_type.startswith("sd2") else "sd1"
    configs["unet"].update(COMMON_UNET, **UNET_SIZES[family])
    configs["vae"].update(VAE_SIZES)
    configs["text_encoder"].update(TEXT_SIZES)
    configs["tokenizer"]["model_max_length"] = TEXT_SIZES["max_position_embeddings"]
    return configs


def small_parts(model_type: str, seed: int = 0) -> PipelineParts:
    """A random small pipeline of ``model_type`` (every weight drawn, so no two tensors are alike)."""
    configs = small_configs(model_type)
    torch.manual_seed(seed)
    parts = PipelineParts(
        UNet2DConditionModel.from_config(configs["unet"]),
        AutoencoderKL.from_config(configs["vae"]),
        CLIPTextModel(CLIPTextConfig(**configs["text_encoder"])),
    )
    with torch.no_grad():
        for network in (parts.unet, parts.vae, parts.text_encoder):
            for parameter in network.parameters():
                parameter.normal_(0.0, 0.05)
    return parts


def original_file_state(parts: PipelineParts, model_type: str) -> dict[str, torch.Tensor]:
    """The weights in the layout the reference files have (SD 2.x: OpenCLIP's whole text tower)."""
    if not model_type.startswith("sd2"):
        return original_state_dict(parts, "sd1")
    state = original_state_dict(parts, "sd2")
    width = parts.text_encoder.config.hidden_size
    last = parts.text_encoder.config.num_hidden_layers
    block = {
        k.replace("resblocks.0.", f"resblocks.{last}."): torch.randn_like(v)
        for k, v in state.items()
        if ".resblocks.0." in k
    }
    return (
        state
        | block
        | {
            "cond_stage_model.model.text_projection": torch.randn(width, width),
            "cond_stage_model.model.logit_scale": torch.tensor(4.6),
        }
    )


def diffusers_tensors(parts: PipelineParts) -> dict[str, torch.Tensor]:
    """Every tensor of the parts, ``part.key`` -> tensor."""
    return {
        f"{name}.{key}": tensor
        for name in ("unet", "vae", "text_encoder")
        for key, tensor in getattr(parts, name).state_dict().items()
    }
