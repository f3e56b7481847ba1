"""Two CPU processes over gloo through the ``lf-train`` command, with gradient accumulation 2: exact
resume under DDP and ZeRO-2 after the whole process group was killed (SIGKILL) and resumed with
``ckpt_path=last``. Every strategy × precision (training, exact resume, export, sampling) is in
``test_precision_matrix.py``.

Each strategy trains once uninterrupted (module fixture), for ``STEPS`` steps with a checkpoint
every 2 steps, all kept: every interrupted-and-resumed run is compared with the checkpoint of the
same step.
"""

from pathlib import Path

import pytest

from tests.integration.checkpoints import assert_resume_is_exact
from tests.integration.cli import kill_cli_when, run_cli
from trainer.checkpoint.reading import load_checkpoint
from trainer.checkpoint.resume import resolve_resume_checkpoint

pytestmark = [pytest.mark.slow, pytest.mark.dist]

STEPS = 6
KEEP_ALL = "callbacks.model_checkpoint.save_top_k=-1"
EMA = "callbacks.ema.decay=0.5"


def two_process_overrides(latent_dir, out, strategy, steps=4):
    return [
        f"strategy={strategy}",
        "trainer.devices=2",
        "trainer.accelerator=cpu",
        f"data.train_dir={latent_dir}",
        f"output_dir={out}",
        f"trainer.max_steps={steps}",
        "trainer.accumulate_grad_batches=2",
        "data.batch_size=8",
        "data.num_workers=0",
        "trainer.log_every_n_steps=1",
        "trainer.enable_progress_bar=false",
        "callbacks.model_checkpoint.every_n_train_steps=2",
    ]


def train(latent_dir, out, strategy, steps, *extra, cwd):
    result = run_cli("lf-train", *two_process_overrides(latent_dir, out, strategy, steps), *extra, cwd=cwd)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def uninterrupted(latent_dir, tmp_path_factory):
    """``uninterrupted(strategy)``: the run folder of an uninterrupted ``STEPS``-step run (trained once)."""
    runs: dict[str, Path] = {}

    def run(strategy: str) -> Path:
        if strategy not in runs:
            cwd = tmp_path_factory.mktemp(strategy)
            train(latent_dir, cwd / "run", strategy, STEPS, EMA, KEEP_ALL, cwd=cwd)
            runs[strategy] = cwd / "run"
        return runs[strategy]

    return run


def step_checkpoint(run: Path, step: int) -> Path:
    return run / "checkpoints" / f"step-{step:07d}.ckpt"


def test_ddp_run_logs_each_rank_and_saves_each_ranks_rng(uninterrupted):
    run = uninterrupted("ddp")
    assert f"training done at step {STEPS}" in (run.parent / "hydra" / "train.log").read_text()
    assert (run.parent / "hydra" / "train_ddp_process_1.log").is_file(), "a second process ran"
    last = load_checkpoint(run / "checkpoints" / "last.ckpt")
    assert last["global_step"] == STEPS
    assert len(last["callbacks"]["RNGState"]["ranks"]) == 2, "each rank's RNG states are saved"
    metrics = (run / "csv" / "version_0" / "metrics.csv").read_text()
    assert "data/skipped_samples" in metrics.splitlines()[0], "the skip count, summed over ranks, is logged"


@pytest.mark.parametrize("strategy", ["ddp", "deepspeed_stage_2"])
def test_run_killed_with_its_process_group_resumes_exactly(uninterrupted, latent_dir, tmp_path, strategy):
    """SIGKILL every rank once the step-2 checkpoint exists; resume from ``last``, two steps further."""
    killed = tmp_path / "killed"
    overrides = [*two_process_overrides(latent_dir, killed, strategy, 1000), EMA, KEEP_ALL]
    kill_cli_when(step_checkpoint(killed, 2), "lf-train", *overrides, cwd=tmp_path)
    target = load_checkpoint(resolve_resume_checkpoint("last", killed / "checkpoints"))["global_step"] + 2
    train(latent_dir, killed, strategy, target, EMA, KEEP_ALL, "ckpt_path=last", cwd=tmp_path)
    reference = uninterrupted(strategy)
    if target > STEPS:  # killed later than usual: train a reference to that step
        reference = tmp_path / "reference"
        train(latent_dir, reference, strategy, target, EMA, KEEP_ALL, cwd=tmp_path)
    assert_resume_is_exact(killed / "checkpoints" / "last.ckpt", step_checkpoint(reference, target))
