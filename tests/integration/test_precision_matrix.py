"""Every strategy we ship × every precision a CPU can run, through ``lf-train``'s code and configs.

Each combination trains 4 steps (2 processes over gloo for all but ``single``; gradient accumulation
2) and must: feed the UNet inputs of its weights' dtype (the bf16 crash under DeepSpeed was a float32
input into bf16 weights), log finite losses, change the weights, update a float32 EMA, resume from
step 2 to step 4 bit for bit without rewriting the checkpoint it resumed from, export a folder that
diffusers' ``StableDiffusionPipeline`` loads and runs, and sample from the checkpoint with the
included sampler. ``16-mixed`` (fp16 autocast; DeepSpeed's fp16 mode) needs CUDA: it is refused
on CPU (``tests/unit/test_precision.py``) and trained by ``test_gpu.py`` when a GPU is lent.
The combinations of :data:`IN_BUCKET` write their checkpoints to a bucket of the test S3 server and
resume from it (the same checks, on the checkpoints downloaded afterwards).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.precision_matrix import check_combination, fetch_remote_checkpoints, run_matrix
from tests.s3_server import make_bucket, point_aws_at

pytestmark = [pytest.mark.slow, pytest.mark.dist]

STRATEGIES = ["single", "ddp", "fsdp", "deepspeed_stage_1", "deepspeed_stage_2", "deepspeed_stage_2_offload",
              "deepspeed_stage_3"]  # fmt: skip
PRECISIONS = ["32-true", "bf16-mixed", "bf16-true"]
IN_BUCKET = {"deepspeed_stage_2": "bf16-mixed"}  # strategy: the precision whose checkpoints go to the S3 server
ROOT = Path(__file__).resolve().parents[2]  # where ``tests`` imports from, for the torchrun workers


def expected_unet(strategy: str, precision: str) -> dict[str, str | None]:
    """What the UNet holds and is fed in its training forward: its weights' dtype, its input's, autocast's."""
    if precision == "32-true":
        return {"weights": "torch.float32", "input": "torch.float32", "autocast": None}
    if precision == "bf16-mixed" and strategy in ("single", "ddp"):  # float32 weights under bf16 autocast
        return {"weights": "torch.float32", "input": "torch.float32", "autocast": "torch.bfloat16"}
    # bf16-true; DeepSpeed's bf16 mode; FSDP's mixed precision (bf16 gathered, float32 shards): bf16 in and out
    return {"weights": "torch.bfloat16", "input": "torch.bfloat16", "autocast": None}


def train_strategy(latent_dir: Path, out: Path, strategy: str, buckets: dict[str, str]) -> None:
    """:func:`run_matrix` of ``strategy`` in every precision: in this process for ``single``, else on 2 ranks."""
    if strategy == "single":
        run_matrix(latent_dir, out, strategy, PRECISIONS, devices=1, buckets=buckets)
        return
    torchrun = Path(sys.executable).parent / "torchrun"
    command = [str(torchrun), "--standalone", "--nproc_per_node=2", "-m", "tests.integration.precision_matrix",
               f"--latents={latent_dir}", f"--out={out}", f"--strategy={strategy}",
               f"--precisions={','.join(PRECISIONS)}",
               *(f"--bucket={precision}={url}" for precision, url in buckets.items())]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "PYTHONPATH": str(ROOT)}
    result = subprocess.run(command, cwd=out, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]


@pytest.fixture(scope="module")
def matrix(latent_dir: Path, tmp_path_factory: pytest.TempPathFactory, s3_server: str):
    """``matrix(strategy)``: the folder of that strategy's runs in every precision (trained once)."""
    runs: dict[str, Path] = {}

    def run(strategy: str) -> Path:
        if strategy in runs:
            return runs[strategy]
        out = tmp_path_factory.mktemp(strategy)
        with pytest.MonkeyPatch.context() as monkeypatch:
            buckets = {}
            if strategy in IN_BUCKET:  # the AWS variables pointing at the server, inherited by the ranks
                point_aws_at(s3_server, monkeypatch)
                buckets = {IN_BUCKET[strategy]: f"{make_bucket()}/{strategy}"}
            train_strategy(latent_dir, out, strategy, buckets)
            for precision, url in buckets.items():
                fetch_remote_checkpoints(url, out / precision)
        runs[strategy] = out
        return out

    return run


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_strategy_trains_resumes_exports_and_samples_in_precision(matrix, strategy, precision, tmp_path):
    check_combination(matrix(strategy) / precision, expected_unet(strategy, precision), tmp_path)
