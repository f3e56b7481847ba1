"""A small random SDXL pipeline folder (diffusers layout), shaped as SDXL base at tiny widths.

SDXL's structure: a plain first down block, then cross-attention blocks, two layers per block,
transformer depth growing with the level (SDXL: 1, 2, 10; here 1, 1, 2), linear projections, the
``text_time`` added embedding (pooled text + six size/crop ``time_ids``), and two text encoders of
different widths (CLIP ViT-L 768 and OpenCLIP bigG 1280 there; 32 and 48 here, as diffusers'
single-file loader tells the two apart by width). Every weight is drawn at random, so no two
tensors are alike and a swapped key cannot go unnoticed.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from trainer.tiny_models.tiny_sdxl_text_encoders import save_tiny_sdxl_text_encoders

WIDTH, WIDTH_2, PROJECTION, TIME_EMBED = 32, 48, 24, 8
UNET = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=[16, 32, 32],
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    transformer_layers_per_block=[1, 1, 2],
    cross_attention_dim=WIDTH + WIDTH_2,  # both encoders' penultimate states, concatenated
    attention_head_dim=[1, 2, 2],
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=TIME_EMBED,
    projection_class_embeddings_input_dim=6 * TIME_EMBED + PROJECTION,
    norm_num_groups=8,
)
VAE = dict(
    block_out_channels=[16, 32],
    layers_per_block=1,
    down_block_types=["DownEncoderBlock2D"] * 2,
    up_block_types=["UpDecoderBlock2D"] * 2,
    norm_num_groups=8,
    scaling_factor=0.13025,  # SDXL's VAE
)
SCHEDULER = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000)


def _randomize(network: torch.nn.Module, std: float = 0.05) -> None:
    with torch.no_grad():
        for parameter in network.parameters():
            parameter.normal_(0.0, std)


def save_small_sdxl(out: Path, seed: int = 0) -> Path:
    """Write a small random ``StableDiffusionXLPipeline`` folder to ``out``; returns ``out``."""
    save_tiny_sdxl_text_encoders(
        out, hidden_size=WIDTH, hidden_size_2=WIDTH_2, projection_dim=PROJECTION, max_length=8, seed=seed
    )
    torch.manual_seed(seed)
    unet, vae = UNet2DConditionModel(**UNET), AutoencoderKL(**VAE)
    _randomize(unet)
    _randomize(vae)
    load = {"local_files_only": True}
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=CLIPTextModel.from_pretrained(out / "text_encoder", **load),
        text_encoder_2=CLIPTextModelWithProjection.from_pretrained(out / "text_encoder_2", **load),
        tokenizer=CLIPTokenizer.from_pretrained(out / "tokenizer", **load),
        tokenizer_2=CLIPTokenizer.from_pretrained(out / "tokenizer_2", **load),
        unet=unet,
        scheduler=DDPMScheduler(**SCHEDULER),
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )
    pipe.save_pretrained(out, safe_serialization=True)
    return out


def pipeline_tensors(pipe: StableDiffusionXLPipeline) -> dict[str, torch.Tensor]:
    """Every tensor of a pipeline's networks, ``part.key`` -> tensor (CLIP's ``text_model.`` level dropped)."""
    return {
        f"{name}.{key.removeprefix('text_model.')}": tensor
        for name in ("unet", "vae", "text_encoder", "text_encoder_2")
        for key, tensor in getattr(pipe, name).state_dict().items()
    }


def small_sdxl_configs() -> dict[str, dict]:
    """SDXL base's standard configs (``conf/base_models/sdxl/``) at small sizes, heads 64 wide as SDXL's:
    what the importer reads back from a file of them with nothing else."""
    from trainer.interop.model_types import BY_NAME

    configs = BY_NAME["sdxl"].configs()
    text = dict(intermediate_size=128, num_hidden_layers=2, max_position_embeddings=8)
    configs["text_encoder"].update(text, hidden_size=64, num_attention_heads=1)
    configs["text_encoder_2"].update(text, hidden_size=128, num_attention_heads=2, projection_dim=32)
    configs["unet"].update(
        block_out_channels=[64, 128, 128],
        attention_head_dim=[1, 2, 2],
        layers_per_block=1,
        transformer_layers_per_block=[1, 1, 2],
        cross_attention_dim=64 + 128,
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + 32,
    )
    configs["vae"].update(VAE, norm_num_groups=32, scaling_factor=0.13025)
    configs["vae"]["block_out_channels"] = [32, 64]
    for name in ("tokenizer", "tokenizer_2"):
        configs[name]["model_max_length"] = 8
    return configs
