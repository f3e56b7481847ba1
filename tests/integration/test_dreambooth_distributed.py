"""DreamBooth recipes on 2 CPU processes through ``lf-train`` (gloo): full fine-tune (fp32) and LoRA
with text-encoder adapters (bf16 autocast) under DDP, LoRA under DeepSpeed ZeRO-2 in its bf16 mode
(text-encoder training under ZeRO-2 bf16 is in test_dreambooth.py), with the processes started by
Lightning's own launcher (``trainer.devices=2``), and a full fine-tune under torchrun. In every run
each rank generates its share of the class images (its log says which). Each run exports a folder that
the sampler loads. DeepSpeed's bf16 mode holds the whole module, the frozen base included, in bf16, and
its checkpoint stores that: a LoRA export's base pipeline is then the base rounded to bf16 (the
adapters, trained against that base, are exact)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.integration.cli import cli_command, run_cli
from tests.integration.dreambooth import INSTANCE_PROMPT, changed_parts, dreambooth_overrides, export_last
from trainer.interop.lora_loading import load_lora
from trainer.sampling.sampler import Sampler, SampleSettings

pytestmark = [pytest.mark.slow, pytest.mark.dist]

CLASS_IMAGES = "data.num_class_images=4"  # 2 per rank


def assert_each_rank_generated_its_share(hydra_dir: Path, class_dir: Path, rank_logs: tuple[str, str]) -> None:
    """Rank ``r`` of 2 generated the class images ``i`` with ``i % 2 == r``, as its log (``rank_logs[r]`` in
    ``hydra_dir``) says; all 4 exist."""
    for rank, shares in enumerate(("[0, 2]", "[1, 3]")):
        log = (hydra_dir / rank_logs[rank]).read_text()
        assert f"rank {rank} of 2 generated class images {shares}" in log, rank_logs[rank]
    assert sorted(path.name for path in class_dir.glob("*.png")) == [f"class-{i:05d}.png" for i in range(4)]


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
    result = run_cli("lf-train", *overrides, CLASS_IMAGES, f"strategy={strategy}", f"trainer.precision={precision}",
                     "trainer.devices=2", cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    rank_logs = ("train.log", "train_ddp_process_1.log")  # the second process's own log: Lightning started it
    assert_each_rank_generated_its_share(tmp_path / "hydra", tmp_path / "c" / "class_images", rank_logs)
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


def test_dreambooth_under_torchrun(base_model, cat_photos, tmp_path):
    """torchrun starts both processes; Lightning takes the ranks from it (full fine-tune, DDP)."""
    run = tmp_path / "run"
    overrides = dreambooth_overrides("dreambooth", base_model, cat_photos, tmp_path / "c", run)
    argv, env = cli_command("lf-train", *overrides, CLASS_IMAGES, "strategy=ddp", "trainer.devices=2", cwd=tmp_path)
    torchrun = Path(sys.executable).parent / "torchrun"
    command = [str(torchrun), "--standalone", "--nproc_per_node=2", "-m", "trainer.cli.train", *argv[1:]]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert not (tmp_path / "hydra" / "train_ddp_process_1.log").exists(), "torchrun, not Lightning, started it"
    assert_each_rank_generated_its_share(tmp_path / "hydra", tmp_path / "c" / "class_images", ("train.log",) * 2)
    assert changed_parts(base_model, export_last(run, tmp_path / "export")) == {"unet"}
