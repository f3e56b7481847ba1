"""The README's SDXL demo, whole (issue: SDXL support is shown to learn, not only to run): the digits
through precompute with two tiny text encoders, training a tiny SDXL-shaped UNet with micro-conditioning,
export as a ``StableDiffusionXLPipeline`` folder and sampling; the digits classifier must read the
prompted digit in the samples. It reuses the shrunk demo's autoencoder (``vae_from``: the VAE does not
depend on the UNet), which the suite trains anyway. About 3 minutes on 2 idle CPU cores."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from trainer.cli.demo import SUMMARY_NAME, run_demo
from trainer.cli.hydra_app import compose_config

pytestmark = pytest.mark.slow


def test_sdxl_demo_generates_the_prompted_digits(demo, tmp_path: Path):
    vae = demo[0] / "base" / "vae"
    summary = run_demo(compose_config("demo", ["train_model=sdxl_tiny", f"out_dir={tmp_path}", f"vae_from={vae}"]))
    assert summary["conditional_accuracy"] >= 0.95, summary
    model_index = json.loads((tmp_path / "export" / "model_index.json").read_text())
    assert model_index["_class_name"] == "StableDiffusionXLPipeline"
    assert json.loads((tmp_path / SUMMARY_NAME).read_text())["conditional_accuracy"] == summary["conditional_accuracy"]
    assert (tmp_path / "base" / "vae" / "diffusion_pytorch_model.safetensors").read_bytes() == (
        vae / "diffusion_pytorch_model.safetensors"
    ).read_bytes()
