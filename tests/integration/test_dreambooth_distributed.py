"""DreamBooth recipes on 2 CPU processes through ``lf-train`` (gloo): full fine-tune (fp32) and LoRA
with text-encoder adapters (bf16 autocast) under DDP, LoRA under DeepSpeed ZeRO-2 in its bf16 mode
(text-encoder training under ZeRO-2 bf16 is in test_dreambooth.py). Each run exports a folder that
the sampler loads. DeepSpeed's bf16 mode holds the whole module, the frozen base included, in bf16, and
its checkpoint stores that: a LoRA export's base pipeline is then the base rounded to bf16 (the
adapters, trained against that base, are exact)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from tests.integration.cli import run_cli
from tests.integration.dreambooth import INSTANCE_PROMPT, changed_parts, dreambooth_overrides, export_last
from trainer.lora.loading import load_lora
from trainer.sampling.sampler import Sampler, SampleSettings

pytestmark = [pytest.mark.slow, pytest.mark.dist]


@pytest.mark.parametrize(
    ("strategy", "precision", "experiment", "lora_parts"),
    [
        ("ddp", "32-true", "dreambooth", None),
        ("ddp", "bf16-mixed", "dreambooth_lora_text_encoder", {"unet", "text_encoder"}),
        ("deepspeed_stage_2", "bf16-mixed", "dreambooth_lora", {"unet"}),  # DeepSpeed's bf16 mode
    ],
)
def test_dreambooth_on_two_processes(base_model, cat_photos, tmp_path, strategy, precision, experiment, lora_parts):
    run = tmp_path / "run"
    overrides = dreambooth_overrides(experiment, base_model, cat_photos, tmp_path / "c", run)
    result = run_cli("lf-train", *overrides, f"strategy={strategy}", f"trainer.precision={precision}",
                     "trainer.devices=2", cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    (metrics,) = (run / "csv").rglob("metrics.csv")  # rank 0's logger only
    assert "train/prior_loss" in metrics.read_text().splitlines()[0]
    export = export_last(run, tmp_path / "export")
    sampler = Sampler.from_export(export, device="cpu")
    if lora_parts is None:  # full fine-tune: the UNet trained, the text encoder is the base's
        assert changed_parts(base_model, export) == {"unet"}
    else:  # only the adapters trained: the pipeline is the base, lora/ holds them
        deepspeed_bf16 = strategy.startswith("deepspeed") and precision.startswith("bf16")
        held_as = {part: torch.bfloat16 for part in lora_parts} if deepspeed_bf16 else None
        assert changed_parts(base_model, export, held_as) == set()
        saved = load_file(export / "lora" / "pytorch_lora_weights.safetensors")
        assert {key.split(".")[0] for key in saved} == lora_parts
        assert set(load_lora(sampler.unet, sampler.text_encoder, export / "lora", 1.0)) == lora_parts
    images, _ = sampler.txt2img([INSTANCE_PROMPT], [0], SampleSettings(steps=2, height=32, width=32))
    assert images[0].size == (32, 32)
