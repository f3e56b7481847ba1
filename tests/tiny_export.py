"""A tiny export folder without training: the conftest's pretrained VAE and text encoder, a seeded UNet."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline
from hydra.utils import instantiate
from omegaconf import OmegaConf
from transformers import CLIPTextModel, CLIPTokenizer

TINY_MODEL = Path(__file__).resolve().parents[1] / "conf" / "model" / "tiny.yaml"


def make_tiny_export(pretrained_dir: Path, out_dir: Path, seed: int = 0) -> Path:
    """Write a diffusers pipeline folder (32x32 images) with a random, seeded tiny UNet."""
    model = OmegaConf.load(TINY_MODEL)
    torch.manual_seed(seed)
    unet = instantiate(model.unet)
    with torch.no_grad():  # diffusers zero-initialises nothing here, but keep the output scale sane
        unet.conv_out.weight.mul_(0.1)
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL.from_pretrained(pretrained_dir / "vae", local_files_only=True),
        text_encoder=CLIPTextModel.from_pretrained(pretrained_dir / "text_encoder", local_files_only=True),
        tokenizer=CLIPTokenizer.from_pretrained(pretrained_dir / "tokenizer", local_files_only=True),
        unet=unet,
        scheduler=instantiate(model.noise_scheduler),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(out_dir, safe_serialization=True)
    return out_dir
