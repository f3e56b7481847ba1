"""Pivotal tuning with text-encoder LoRA (``experiment=pivotal_lora_text_encoder``) on 2 CPU processes (torchrun,
gloo) in bf16 under DDP and DeepSpeed ZeRO-2, both in one launch (the imports are paid once): the new rows, the
UNet's and the encoder's adapters train, and a run resumed from the step-2 checkpoint ends bit-identical to the
uninterrupted one (weights, every rank's optimizer state, LR schedule, data position). Under DDP the rows stop at the
freeze step (2 of 4, where the resume starts) while both kinds of adapter go on; DeepSpeed refuses a freeze
(it steps its own copy of the rows), so its rows train throughout (``train_fraction=1``, the refusal's fix)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.integration.checkpoints import assert_resume_is_exact
from tests.integration.precision_matrix import RESUME_FROM, STEPS
from trainer.checkpoint.reading import load_checkpoint

pytestmark = [pytest.mark.slow, pytest.mark.dist]

ROOT = Path(__file__).resolve().parents[2]
STRATEGIES = ["ddp", "deepspeed_stage_2"]
PRECISION = "bf16-mixed"


@pytest.fixture(scope="module")
def runs(base_model: Path, latent_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``<runs>/<strategy>/bf16-mixed/{full,resumed}``: each strategy's 4-step run and its resume from step 2."""
    out = tmp_path_factory.mktemp("pivotal_distributed")
    pivotal = ["experiment=pivotal_lora_text_encoder", f"model.pretrained={base_model}",
               "model.textual_inversion.tokens=['<d7>']", "model.textual_inversion.init_word=digit",
               "model.textual_inversion.templates=['a handwritten {}']", "model.lora.rank=2",
               "optim.lr=0.01", "optim.embedding_lr=0.1"]  # fmt: skip
    torchrun = Path(sys.executable).parent / "torchrun"
    command = [str(torchrun), "--standalone", "--nproc_per_node=2", "-m", "tests.integration.precision_matrix",
               f"--latents={latent_dir}", f"--out={out}", f"--strategy={','.join(STRATEGIES)}",
               f"--precisions={PRECISION}", "--no-ema", *(f"--extra={override}" for override in pivotal),
               "--strategy-extra=deepspeed_stage_2=model.textual_inversion.train_fraction=1"]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "PYTHONPATH": str(ROOT)}
    result = subprocess.run(command, cwd=out, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return out


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_pivotal_text_encoder_lora_trains_freezes_rows_and_resumes_exactly(runs, strategy):
    full, resumed = runs / strategy / PRECISION / "full", runs / strategy / PRECISION / "resumed"
    end_path = full / "checkpoints" / f"step-{STEPS:07d}.ckpt"
    middle, end = load_checkpoint(full / "checkpoints" / f"step-{RESUME_FROM:07d}.ckpt"), load_checkpoint(end_path)
    rows = end["latentforge"]["textual_inversion"]["row_keys"]
    raw_middle, raw_end = middle["state_dict"], end["state_dict"]  # LoRA experiments keep no EMA
    unet = [key for key in raw_end if "lora_" in key and key.startswith("unet.")]
    encoder = [key for key in raw_end if "lora_" in key and key.startswith("text_encoders.")]
    assert rows and unet and encoder
    rows_went_on = [not torch.equal(raw_middle[key], raw_end[key]) for key in rows]
    assert rows_went_on == [strategy != "ddp"] * len(rows), "DDP: the rows stop at the freeze step; DeepSpeed: never"
    for adapters in (unet, encoder):  # both kinds of adapter go on
        assert any(not torch.equal(raw_middle[key], raw_end[key]) for key in adapters), adapters[0]
    assert sorted(p.name for p in (resumed / "checkpoints").iterdir()) == ["last.ckpt", end_path.name]
    assert_resume_is_exact(
        resumed / "checkpoints" / "last.ckpt", end_path, ranks=2, data_module="CaptionedLatentDataModule"
    )
