"""Fixtures of the DreamBooth tests: a tiny base model trained in the test, and real photos."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from tests.conftest import compose_config, tiny_train_overrides
from trainer.cli.export import run_export
from trainer.cli.train import run_train

BASE_STEPS = 20


def unit_variance_vae(pretrained_dir: Path, out: Path) -> Path:
    """A copy of ``pretrained_dir`` whose (random) VAE's ``scaling_factor`` gives the digits' latents unit
    variance, as SD's 0.18215 does for its VAE (the shared fixture keeps diffusers' default, which
    leaves this VAE's latents at a standard deviation near 0.07, far below the noise)."""
    from diffusers import AutoencoderKL

    from data_pipelines.image_transforms import image_to_pixels
    from data_pipelines.sources.digits import digit_to_image, digits_split

    shutil.copytree(pretrained_dir, out)
    vae = AutoencoderKL.from_pretrained(out / "vae", local_files_only=True)
    images, _, _ = digits_split("train")
    pixels = torch.stack([image_to_pixels(digit_to_image(digit, 32)) for digit in images[:64]])  # (64, 3, 32, 32)
    with torch.no_grad():
        std = float(vae.encode(pixels).latent_dist.mode().std())
    config_file = out / "vae" / "config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "scaling_factor": 1.0 / std}))
    return out


@pytest.fixture(scope="session")
def base_model(pretrained_dir: Path, raw_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny text-to-image model (trained on digits, on unit-variance latents) exported as a pipeline folder."""
    from trainer.cli.precompute import run_precompute

    out = tmp_path_factory.mktemp("base")
    encoders = unit_variance_vae(pretrained_dir, out / "pretrained")
    latent_dir = out / "latents"
    run_precompute(compose_config("precompute", [
        f"shards={raw_shards}", f"out_dir={latent_dir}", f"pretrained={encoders}", "resolution=32", "batch_size=48",
    ]))  # fmt: skip
    run_train(compose_config("train", tiny_train_overrides(latent_dir, out / "run", steps=BASE_STEPS)))
    checkpoint = out / "run" / "checkpoints" / "last.ckpt"
    run_export(compose_config("export", [f"ckpt_path={checkpoint}", f"out_dir={out / 'export'}"]))
    return out / "export"


@pytest.fixture(scope="session")
def cat_photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four crops of scikit-image's photo of Chelsea the cat."""
    from skimage.data import chelsea

    photo, folder = chelsea(), tmp_path_factory.mktemp("instance")
    for i, (top, left) in enumerate([(0, 60), (40, 100), (80, 140), (20, 200)]):
        Image.fromarray(photo[top : top + 220, left : left + 220]).save(folder / f"chelsea-{i}.png")
    return folder
