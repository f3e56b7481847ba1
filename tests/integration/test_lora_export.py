"""lf-train experiment=lora (and DreamBooth with text-encoder adapters) -> lf-export: the adapters load
in diffusers and in our sampler, and reproduce the trained model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import compose_config, tiny_train_overrides
from trainer.checkpoint.reading import build_unet, load_checkpoint
from trainer.cli.export import run_export
from trainer.cli.sample import run_sample
from trainer.cli.train import run_train
from trainer.interop.lora_loading import load_lora
from trainer.sampling.sampler import Sampler

pytestmark = pytest.mark.slow


def test_lora_run_exports_base_plus_adapters_that_diffusers_loads(latent_dir, tmp_path):
    from diffusers import StableDiffusionPipeline

    run = tmp_path / "run"
    lora = ["experiment=lora", "optim.lr=2e-2", "model.lora.alpha=8"]  # scale alpha/rank = 2
    compiled = ["model.compile_unet=true", "model.compile_options={backend:aot_eager}"]  # the GPU default: compiled
    run_train(compose_config("train", [*tiny_train_overrides(latent_dir, run, steps=6), *lora, *compiled]))
    saved = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert not [k for k in (*saved["state_dict"], *saved["ema_state_dict"]) if "_orig_mod" in k]
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
        assert load_lora(ours.unet, ours.text_encoder, export / "lora" / lora_file, scale=1.0) == ["unet"]
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


def test_dreambooth_lora_on_unet_and_text_encoder(base_model, cat_photos, tmp_path):
    from diffusers import StableDiffusionPipeline

    from tests.integration.dreambooth import INSTANCE_PROMPT, changed_parts, dreambooth_overrides, export_last
    from trainer.checkpoint.reading import build_text_encoder

    run = tmp_path / "run"
    overrides = dreambooth_overrides("dreambooth_lora_text_encoder", base_model, cat_photos, tmp_path / "c", run)
    run_train(compose_config("train", [*overrides, "optim.lr=2e-2", "model.lora.alpha=8"]))  # scale alpha/rank = 2
    export = export_last(run, tmp_path / "export")
    assert changed_parts(base_model, export) == set()  # the pipeline holds the untouched base; adapters in lora/
    diffusers_keys = load_file(export / "lora" / "pytorch_lora_weights.safetensors").keys()
    assert {k.split(".")[0] for k in diffusers_keys} == {"unet", "text_encoder"}
    assert all(k.startswith("text_encoder.text_model.encoder.") for k in diffusers_keys if "text_encoder" in k)
    kohya_keys = load_file(export / "lora" / "lora_kohya.safetensors").keys()
    assert {k.split("_")[1] for k in kohya_keys} == {"unet", "te"}
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in kohya_keys

    checkpoint = load_checkpoint(run / "checkpoints" / "last.ckpt")
    trained_text = build_text_encoder(checkpoint, str(base_model / "text_encoder"), "raw").eval()
    trained_unet, _ = build_unet(checkpoint)
    pipe = StableDiffusionPipeline.from_pretrained(export, local_files_only=True)
    ids = pipe.tokenizer([INSTANCE_PROMPT], padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         truncation=True, return_tensors="pt").input_ids  # fmt: skip
    x, t = torch.randn(1, 4, 8, 8), torch.tensor([500])

    def outputs(text_encoder, unet) -> tuple[torch.Tensor, torch.Tensor]:  # (1, T, D) and (1, 4, 8, 8)
        with torch.no_grad():
            embedding = text_encoder(ids).last_hidden_state
            return embedding, unet(x, t, embedding).sample

    trained, base = outputs(trained_text, trained_unet), outputs(pipe.text_encoder, pipe.unet)
    assert not torch.allclose(trained[0], base[0], atol=1e-3)  # the text encoder's adapters trained
    pipe.load_lora_weights(export / "lora", weight_name="pytorch_lora_weights.safetensors")
    for got, want in zip(outputs(pipe.text_encoder, pipe.unet), trained, strict=True):  # diffusers, both parts
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    for lora_file in ("pytorch_lora_weights.safetensors", "lora_kohya.safetensors"):  # ours, at scales 1 and 0
        for scale, want in ((1.0, trained), (0.0, base)):
            ours = Sampler.from_export(export, device="cpu")
            parts = load_lora(ours.unet, ours.text_encoder, export / "lora" / lora_file, scale)
            assert parts == ["unet", "text_encoder"]
            for got, expected in zip(outputs(ours.text_encoder, ours.unet), want, strict=True):
                torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    merged = Sampler.from_checkpoint(run / "checkpoints" / "last.ckpt", device="cpu")  # adapters fused
    for got, want in zip(outputs(merged.text_encoder, merged.unet), trained, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
