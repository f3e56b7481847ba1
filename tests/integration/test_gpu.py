"""On one CUDA GPU (skipped without one): each strategy trains a few steps in each GPU precision,
``16-mixed`` (fp16 autocast with loss scaling; DeepSpeed's fp16 mode) included, which a CPU cannot
run; it resumes, exports a folder diffusers loads, and samples. Run when a GPU is lent
(``bench/gpu_checks.sh``)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.integration.precision_matrix import check_combination, run_matrix

pytestmark = [pytest.mark.gpu, pytest.mark.slow]

GPU_PRECISIONS = ["bf16-mixed", "16-mixed"]


def expected_unet_on_cuda(strategy: str, precision: str) -> dict[str, str | None]:
    """What the UNet holds and is fed: autocast for single and DDP; 16-bit weights for DeepSpeed and FSDP."""
    half = "torch.bfloat16" if precision.startswith("bf16") else "torch.float16"
    if strategy in ("single", "ddp"):
        return {"weights": "torch.float32", "input": "torch.float32", "autocast": half}
    return {"weights": half, "input": half, "autocast": None}


@pytest.mark.parametrize("strategy", ["single", "ddp", "fsdp", "deepspeed_stage_2", "deepspeed_stage_3"])
def test_strategy_trains_in_gpu_precisions(latent_dir: Path, tmp_path: Path, strategy: str):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    precisions = [p for p in GPU_PRECISIONS if p != "bf16-mixed" or torch.cuda.is_bf16_supported()]
    run_matrix(latent_dir, tmp_path / "runs", strategy, precisions, devices=1, accelerator="cuda")
    for precision in precisions:
        check_combination(
            tmp_path / "runs" / precision,
            expected_unet_on_cuda(strategy, precision),
            tmp_path / precision,
            exact_resume=False,  # CUDA kernels need not be bit-deterministic
            ranks=1,
        )
