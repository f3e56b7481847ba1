"""Fixtures shared by integration tests: the README's demo (shrunk), the DreamBooth tests' tiny base
model trained in the test, and real photos."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from omegaconf import DictConfig, open_dict
from PIL import Image

from tests.built_once import built_once
from tests.conftest import compose_config, tiny_train_overrides
from trainer.cli.demo import SUMMARY_NAME, run_demo
from trainer.cli.export import run_export
from trainer.cli.train import run_train

# The demo, shrunk: 300 digits, 150 autoencoder steps, 500 UNet steps of 64.
DEMO_SHRINK = {
    "shards": ["source.limit=300", "samples_per_shard=100"],
    "autoencoder": ["trainer.max_steps=150"],
    "train": ["trainer.max_steps=500", "data.batch_size=64"],
}


def shrunk_demo_config(out: Path) -> DictConfig:
    """``lf-demo out_dir=out`` with :data:`DEMO_SHRINK` added to its stages, 10 samples per digit."""
    cfg = compose_config("demo", [f"out_dir={out}", "samples_per_prompt=10"])
    with open_dict(cfg):
        for stage, extra in DEMO_SHRINK.items():
            cfg.stages[stage] = [*cfg.stages[stage], *extra]
    return cfg


@pytest.fixture(scope="session")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """The shrunk demo's output folder and summary: a text-conditional model of the digits
    (trained autoencoder, conditional accuracy well above chance) in ``out / "export"``."""
    out = built_once(tmp_path_factory, "demo", lambda out: run_demo(shrunk_demo_config(out)))
    return out, json.loads((out / SUMMARY_NAME).read_text())


@pytest.fixture(scope="session")
def base_model(latent_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny text-to-image model (20 steps on digits, random VAE) exported as a pipeline folder: for
    tests of the mechanics (it barely reads its prompt; the ``demo`` fixture's model does)."""

    def build(out: Path) -> None:
        run_train(compose_config("train", tiny_train_overrides(latent_dir, out / "run", steps=20)))
        checkpoint = out / "run" / "checkpoints" / "last.ckpt"
        run_export(compose_config("export", [f"ckpt_path={checkpoint}", f"out_dir={out / 'export'}"]))

    return built_once(tmp_path_factory, "base", build) / "export"


@pytest.fixture(scope="session")
def sdxl_base_model(sdxl_latent_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny SDXL-shaped text-to-image model (``model=sdxl_tiny``, 4 steps on digits, random VAE) exported
    as a ``StableDiffusionXLPipeline`` folder (both text encoders): for the SDXL DreamBooth/LoRA mechanics."""

    def build(out: Path) -> None:
        overrides = [*tiny_train_overrides(sdxl_latent_dir, out / "run", steps=4), "model=sdxl_tiny"]
        run_train(compose_config("train", overrides))
        checkpoint = out / "run" / "checkpoints" / "last.ckpt"
        run_export(compose_config("export", [f"ckpt_path={checkpoint}", f"out_dir={out / 'export'}"]))

    return built_once(tmp_path_factory, "sdxl_base", build) / "export"


@pytest.fixture(scope="session")
def cat_photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four crops of scikit-image's photo of Chelsea the cat."""
    from skimage.data import chelsea

    photo, folder = chelsea(), tmp_path_factory.mktemp("instance")
    for i, (top, left) in enumerate([(0, 60), (40, 100), (80, 140), (20, 200)]):
        Image.fromarray(photo[top : top + 220, left : left + 220]).save(folder / f"chelsea-{i}.png")
    return folder
