"""The README's demo, shrunk: a few hundred real digits through every stage, end to end (CPU)."""

import json
from pathlib import Path

import numpy as np
import pytest
from omegaconf import open_dict
from PIL import Image

from tests.integration.conftest import shrunk_demo_config
from trainer.cli.demo import SUMMARY_NAME, run_demo
from trainer.sampling.png_info import read_parameters

pytestmark = pytest.mark.slow

# The `demo` fixture (tests/integration/conftest.py) runs the shrunk demo once per test session.


def test_every_stage_leaves_its_output(demo):
    out, summary = demo
    assert len(list((out / "shards").glob("*.tar"))) == 3
    assert (out / "base" / "vae" / "config.json").is_file()
    assert (out / "base" / "text_encoder" / "model.safetensors").is_file()
    manifest = json.loads((out / "latents" / "manifest.json").read_text())
    assert manifest["latent_shape"] == [4, 8, 8] and manifest["text_shape"] == [8, 32]
    assert sum(s["num_samples"] for s in manifest["shards"]) == 300
    assert (out / "train" / "checkpoints" / "last.ckpt").is_file()
    assert (out / "export" / "model_index.json").is_file()
    assert json.loads((out / SUMMARY_NAME).read_text())["conditional_accuracy"] == summary["conditional_accuracy"]
    assert set(summary["stage_seconds"]) == {
        "shards",
        "text_encoder",
        "autoencoder",
        "precompute",
        "train",
        "export",
        "sample",
        "classifier",
        "heldout_shards",
        "eval",
    }
    assert json.loads((out / "eval" / "eval.json").read_text())["num_reference"] == 360


def test_generated_digits_are_the_prompted_ones(demo):
    _, summary = demo
    assert summary["num_generated"] == 100
    assert summary["conditional_accuracy"] >= 0.5, summary
    # FID in the digits classifier's features: real digits score about 1.5, noise about 30
    assert 0 < summary["fid"] < 10 * summary["fid_real_digits"], summary


def test_samples_carry_their_parameters(demo):
    out, _ = demo
    pngs = sorted((out / "samples").glob("0*.png"))
    assert len(pngs) == 100
    assert read_parameters(pngs[0]).startswith("a handwritten digit zero\n")
    assert "Seed: 0" in read_parameters(pngs[0]) and "CFG scale: 3" in read_parameters(pngs[0])
    assert Image.open(out / "samples" / "grid.png").size == (10 * 32, 10 * 32)


def test_diffusers_pipeline_loads_the_export_and_is_deterministic(demo):
    import torch
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    out, _ = demo
    pipe = StableDiffusionPipeline.from_pretrained(Path(out / "export"), local_files_only=True)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)

    def generate():
        return pipe(
            "a handwritten digit three",
            num_inference_steps=10,
            guidance_scale=3.0,
            generator=torch.Generator().manual_seed(5),
            output_type="np",
        ).images[0]

    first, second = generate(), generate()
    assert first.shape == (32, 32, 3)
    assert np.array_equal(first, second)


def test_v_prediction_reaches_epsilon_accuracy_on_the_same_budget(demo, tmp_path):
    _, epsilon = demo
    cfg = shrunk_demo_config(tmp_path)
    with open_dict(cfg):
        cfg.stages.train = [*cfg.stages.train, "objective=v"]
    v_prediction = run_demo(cfg)
    scheduler = json.loads((tmp_path / "export" / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["prediction_type"] == "v_prediction"
    assert v_prediction["conditional_accuracy"] >= epsilon["conditional_accuracy"] - 0.15, (v_prediction, epsilon)
