"""lf-train experiment=lora -> lf-export: the adapters load in diffusers and change its images."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import compose_config, tiny_train_overrides
from trainer.cli.export import run_export
from trainer.cli.sample import run_sample
from trainer.cli.train import run_train
from trainer.export import build_unet, load_checkpoint
from trainer.lora.loading import load_lora_into_unet
from trainer.sampling.sampler import Sampler

pytestmark = pytest.mark.slow


def test_lora_run_exports_base_plus_adapters_that_diffusers_loads(latent_dir, tmp_path):
    from diffusers import StableDiffusionPipeline

    run = tmp_path / "run"
    lora = ["experiment=lora", "optim.lr=2e-2", "model.lora.alpha=8"]  # scale alpha/rank = 2
    run_train(compose_config("train", [*tiny_train_overrides(latent_dir, run, steps=6), *lora]))
    export = tmp_path / "export"
    run_export(compose_config("export", [f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}", f"out_dir={export}"]))
    kohya = load_file(export / "lora" / "lora_kohya.safetensors")
    assert kohya and all(k.startswith("lora_unet_") for k in kohya)

    pipe = StableDiffusionPipeline.from_pretrained(export, local_files_only=True)
    assert not any("lora" in k for k in pipe.unet.state_dict())  # the pipeline's UNet is the base

    def image() -> np.ndarray:
        generator = torch.Generator().manual_seed(0)
        return pipe("a handwritten digit seven", num_inference_steps=3, height=32, width=32, guidance_scale=3.0,
                    generator=generator, output_type="np").images[0]  # fmt: skip

    base = image()
    pipe.load_lora_weights(export / "lora", weight_name="pytorch_lora_weights.safetensors")
    with_lora = image()
    assert np.abs(with_lora - base).max() > 1e-3  # the adapters change the output

    trained_unet, _ = build_unet(load_checkpoint(run / "checkpoints" / "last.ckpt"))  # as in training
    x, t, text = torch.randn(2, 4, 8, 8), torch.tensor([10, 500]), torch.randn(2, 8, 32)
    with torch.no_grad():  # diffusers applies the adapters with the trained scale (alpha/rank from metadata)
        torch.testing.assert_close(pipe.unet(x, t, text).sample, trained_unet(x, t, text).sample, atol=1e-5, rtol=0)

    # Our sampler applies both files at a scale: 1 gives the trained model, 0 the base.
    for lora_file in ("pytorch_lora_weights.safetensors", "lora_kohya.safetensors"):
        ours = Sampler.from_export(export, device="cpu")
        load_lora_into_unet(ours.unet, export / "lora" / lora_file, scale=1.0)
        with torch.no_grad():
            torch.testing.assert_close(ours.unet(x, t, text).sample, trained_unet(x, t, text).sample, atol=1e-5, rtol=0)
            ours.unet.set_adapters(["lora"], weights=[0.0])
            base_unet = StableDiffusionPipeline.from_pretrained(export, local_files_only=True).unet
            torch.testing.assert_close(ours.unet(x, t, text).sample, base_unet(x, t, text).sample, atol=1e-6, rtol=0)
    sampled = run_sample(compose_config("sample", [
        f"model_dir={export}", f"lora={export / 'lora'}", "lora_scale=0.5", "prompts=[a handwritten digit seven]",
        "num_images_per_prompt=1", "steps=2", f"out_dir={tmp_path / 'samples'}",
    ]))  # fmt: skip
    assert len(sampled["paths"]) == 1

    pipe.fuse_lora(lora_scale=1.0)
    pipe.unload_lora_weights()  # fused weights stay, adapter layers go
    assert not any("lora" in k for k in pipe.unet.state_dict())
    np.testing.assert_allclose(image(), with_lora, atol=1e-4)  # merged == applied at scale 1
