"""data=mixed under the sharded strategies: a set with repeats beside a regularization set, on 2 CPU processes
(torchrun, gloo) in bf16 under DeepSpeed ZeRO-2 and FSDP, through ``lf-train``'s code and configs (both in one
launch: the imports are paid once). Each feeds the UNet bf16, logs finite losses for both datasets, records both
folders in its checkpoints, and resumes from step 2 to step 4 bit for bit (weights, EMA, every rank's optimizer
partition, the mixed stream's position). Export and sampling of these strategies: ``test_precision_matrix.py``."""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.checkpoints import assert_resume_is_exact
from tests.integration.precision_matrix import RESUME_FROM, STEPS
from trainer.checkpoint.reading import load_checkpoint

pytestmark = [pytest.mark.slow, pytest.mark.dist]

ROOT = Path(__file__).resolve().parents[2]
STRATEGIES = ["deepspeed_stage_2", "fsdp"]
PRECISION = "bf16-mixed"
BF16_THROUGHOUT = {"weights": "torch.bfloat16", "input": "torch.bfloat16", "autocast": None}  # ZeRO's bf16, FSDP's


@pytest.fixture(scope="module")
def runs(latent_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``<runs>/<strategy>/bf16-mixed/{full,resumed}``: each strategy's two runs on two datasets."""
    out = tmp_path_factory.mktemp("mixed_strategies")
    reg = out / "reg"
    shutil.copytree(latent_dir, reg)
    entries = f"[{{path:{latent_dir},repeats:2,name:subject}},{{path:{reg},is_reg:true,name:reg}}]"
    mixed = ["data=mixed", "data.train_dir=null", f"data.datasets={entries}", "data.prior_loss_weight=0.5"]
    torchrun = Path(sys.executable).parent / "torchrun"
    command = [str(torchrun), "--standalone", "--nproc_per_node=2", "-m", "tests.integration.precision_matrix",
               f"--latents={latent_dir}", f"--out={out}", f"--strategy={','.join(STRATEGIES)}",
               f"--precisions={PRECISION}", *(f"--extra={override}" for override in mixed)]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "PYTHONPATH": str(ROOT)}
    result = subprocess.run(command, cwd=out, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return out


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_two_datasets_train_and_resume_exactly_on_two_ranks(runs, strategy):
    full, resumed = runs / strategy / PRECISION / "full", runs / strategy / PRECISION / "resumed"
    assert json.loads((full / "unet_inputs.json").read_text()) == BF16_THROUGHOUT
    (metrics,) = (full / "csv").rglob("metrics.csv")  # rank 0's logger
    with metrics.open() as handle:
        rows = list(csv.DictReader(handle))
    for name in ("train/loss", "train/loss_subject", "train/loss_reg"):
        losses = [float(row[name]) for row in rows if row.get(name)]
        assert losses and all(math.isfinite(x) for x in losses), (name, losses)
    end = full / "checkpoints" / f"step-{STEPS:07d}.ckpt"
    assert [d["name"] for d in load_checkpoint(end)["latentforge"]["datasets"]] == ["subject", "reg"]
    assert sorted(p.name for p in (resumed / "checkpoints").iterdir()) == ["last.ckpt", end.name], (
        f"resumed from step {RESUME_FROM}, whose checkpoint is not written again"
    )
    assert_resume_is_exact(resumed / "checkpoints" / "last.ckpt", end, ranks=2, data_module="MixedLatentDataModule")
