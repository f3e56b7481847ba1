"""An inpainting model from one file: lf-import (nothing else) -> lf-precompute inpainting=true -> lf-train
model=pretrained -> lf-export -> lf-sample with an init image and a mask, on CPU."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from data_pipelines.latents.format import LatentManifest
from data_pipelines.transforms.masks import MaskSettings, random_mask
from tests.conftest import compose_config, tiny_train_overrides
from tests.small_sd import original_file_state, small_parts
from trainer.cli.export import run_export
from trainer.cli.import_model import run_import
from trainer.cli.precompute import run_precompute
from trainer.cli.sample import run_sample
from trainer.cli.train import run_train
from trainer.diffusion.unet_kinds import INPAINTING_IN_CHANNELS

pytestmark = pytest.mark.slow


def test_masks_are_fixed_per_sample_and_sometimes_whole():
    settings = MaskSettings(seed=3)
    masks = [random_mask(f"sample-{i}", 32, 32, settings) for i in range(40)]
    assert torch.equal(masks[0], random_mask("sample-0", 32, 32, settings))  # the same key, the same mask
    assert not torch.equal(masks[0], random_mask("sample-0", 32, 32, MaskSettings(seed=4)))
    whole = sum(bool(m.all()) for m in masks)
    assert 0 < whole < 40 and all(m.any() for m in masks)  # a full mask sometimes (25%), else rectangles


def test_inpainting_model_fine_tunes_and_samples(raw_shards, tmp_path):
    source = tmp_path / "sd15-inpainting.safetensors"
    parts = small_parts("sd1_inpainting")
    save_file({k: v.contiguous() for k, v in original_file_state(parts, "sd1_inpainting").items()}, str(source))
    base = Path(
        run_import(compose_config("import", [f"pretrained={source}", f"out_dir={tmp_path / 'base'}"]))["out_dir"]
    )

    latents = tmp_path / "latents"
    run_precompute(compose_config("precompute", [
        f"shards={raw_shards}", f"out_dir={latents}", f"pretrained={base}", "resolution=32", "batch_size=48",
        "inpainting=true",
    ]))  # fmt: skip
    manifest = LatentManifest.load(latents)
    assert manifest.inpainting and manifest.latent_shape == [4, 16, 16]

    run = tmp_path / "run"
    train = [*tiny_train_overrides(latents, run, steps=2), "model=pretrained", f"model.pretrained={base}"]
    metrics = run_train(compose_config("train", train))
    assert np.isfinite(metrics["train/loss"])
    export = tmp_path / "export"
    run_export(compose_config("export", [f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}", f"out_dir={export}"]))
    assert json.loads((export / "model_index.json").read_text())["_class_name"] == "StableDiffusionInpaintPipeline"
    assert json.loads((export / "unet" / "config.json").read_text())["in_channels"] == INPAINTING_IN_CHANNELS

    init, mask = tmp_path / "init.png", tmp_path / "mask.png"
    Image.fromarray(np.full((32, 32, 3), 200, dtype=np.uint8)).save(init)
    holes = np.zeros((32, 32), dtype=np.uint8)
    holes[8:24, 8:24] = 255  # white: paint
    Image.fromarray(holes).save(mask)
    sampled = run_sample(compose_config("sample", [
        f"model_dir={export}", f"init_image={init}", f"mask_image={mask}", "prompts=[a handwritten digit]",
        "num_images_per_prompt=2", "steps=2", "height=32", "width=32", f"out_dir={tmp_path / 'samples'}",
    ]))  # fmt: skip
    assert len(sampled["paths"]) == 2 and all(Path(p).is_file() for p in sampled["paths"])
    plain = run_sample(compose_config("sample", [
        f"model_dir={export}", "prompts=[a handwritten digit]", "num_images_per_prompt=1", "steps=2",
        "height=32", "width=32", f"out_dir={tmp_path / 'txt2img'}",
    ]))  # fmt: skip
    assert len(plain["paths"]) == 1  # txt2img with an inpainting model: everything masked
