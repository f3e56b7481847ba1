"""DreamBooth recipes on 2 CPU processes through ``lf-train`` (gloo): full fine-tune and LoRA (with
text-encoder adapters) under DDP, LoRA under DeepSpeed ZeRO-2 (text-encoder training under ZeRO-2 is
in test_dreambooth.py). Each run exports a folder that the sampler loads."""

from __future__ import annotations

import pytest
from safetensors.torch import load_file

from tests.integration.cli import run_cli
from tests.integration.dreambooth import INSTANCE_PROMPT, changed_parts, dreambooth_overrides, export_last
from trainer.lora.loading import load_lora
from trainer.sampling.sampler import Sampler, SampleSettings

pytestmark = [pytest.mark.slow, pytest.mark.dist]


@pytest.mark.parametrize(
    ("strategy", "experiment", "lora_parts"),
    [
        ("ddp", "dreambooth", None),
        ("ddp", "dreambooth_lora_text_encoder", {"unet", "text_encoder"}),
        ("deepspeed_stage_2", "dreambooth_lora", {"unet"}),
    ],
)
def test_dreambooth_on_two_processes(base_model, cat_photos, tmp_path, strategy, experiment, lora_parts):
    run = tmp_path / "run"
    overrides = dreambooth_overrides(experiment, base_model, cat_photos, tmp_path / "c", run)
    result = run_cli("lf-train", *overrides, f"strategy={strategy}", "trainer.devices=2", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    (metrics,) = (run / "csv").rglob("metrics.csv")  # rank 0's logger only
    assert "train/prior_loss" in metrics.read_text().splitlines()[0]
    export = export_last(run, tmp_path / "export")
    sampler = Sampler.from_export(export, device="cpu")
    if lora_parts is None:  # full fine-tune: the UNet trained, the text encoder is the base's
        assert changed_parts(base_model, export) == {"unet"}
    else:  # only the adapters trained: the pipeline is the base, lora/ holds them
        assert changed_parts(base_model, export) == set()
        saved = load_file(export / "lora" / "pytorch_lora_weights.safetensors")
        assert {key.split(".")[0] for key in saved} == lora_parts
        assert set(load_lora(sampler.unet, sampler.text_encoder, export / "lora", 1.0)) == lora_parts
    images, _ = sampler.txt2img([INSTANCE_PROMPT], [0], SampleSettings(steps=2, height=32, width=32))
    assert images[0].size == (32, 32)
