"""A tiny export folder without training: a pretrained-style folder's VAE and text encoder, a seeded tiny UNet.

The sampler tests (parity with diffusers, single-file round trips) and the sampler benchmark use it.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline
from hydra.utils import instantiate
from omegaconf import OmegaConf
from transformers import CLIPTextModel, CLIPTokenizer

TINY_MODEL = resources.files("latentforge_conf") / "model" / "tiny.yaml"  # conf/model/tiny.yaml


def make_tiny_export(pretrained_dir: Path, out_dir: Path, seed: int = 0) -> Path:
    """Write a diffusers pipeline folder (32x32 images) with a random, seeded tiny UNet (``conf/model/tiny.yaml``).

    Args:
        pretrained_dir: a folder with ``vae/``, ``text_encoder/`` and ``tokenizer/`` (diffusers layout).
        out_dir: the export folder to write.
    """
    model = OmegaConf.load(str(TINY_MODEL))
    model.noise_scheduler.prediction_type = None  # outside lf-train's config: no objective to follow (epsilon)
    torch.manual_seed(seed)
    unet = instantiate(model.unet)
    with torch.no_grad():  # a random UNet's output is large; scale it down so images are not saturated
        unet.conv_out.weight.mul_(0.1)
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL.from_pretrained(pretrained_dir / "vae", local_files_only=True),
        text_encoder=CLIPTextModel.from_pretrained(pretrained_dir / "text_encoder", local_files_only=True),
        tokenizer=CLIPTokenizer.from_pretrained(pretrained_dir / "tokenizer", local_files_only=True),
        unet=unet,
        scheduler=instantiate(model.noise_scheduler, prediction_type=None),  # no objective here: epsilon
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(out_dir, safe_serialization=True)
    return out_dir
