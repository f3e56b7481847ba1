"""Two CPU processes over gloo through the ``lf-train`` command, with gradient accumulation 2: exact
resume under DDP and ZeRO-2 after the whole process group was killed (SIGKILL) and resumed with
``ckpt_path=last``, and after a preemption signal (SIGTERM to one rank under DDP, SIGUSR1 to every
rank under ZeRO-2) at a step drawn from a seed, resumed by the same command (``auto_resume=true``)
with the checkpoints in a bucket of a real S3 server (moto): each one complete there (a ZeRO folder with
every rank's partition and its ``latest`` tag), none left on local disk;
under torchrun with restarts, a rank killed and a rank hung cost nothing either.
Every strategy × precision (training, exact resume, export, sampling) is in ``test_precision_matrix.py``.

Each strategy trains once uninterrupted (module fixture), for ``STEPS`` steps with a checkpoint
every 2 steps, all kept: every interrupted-and-resumed run is compared with the checkpoint of the
same step.
"""

import random
import subprocess
import sys
from pathlib import Path

import pytest

from lf_common import object_store
from lf_common.object_cache import cached_copy
from tests.integration.checkpoints import assert_resume_is_exact
from tests.integration.cli import cli_command, kill_cli_when, run_cli
from tests.integration.faults import FAULTS_ENV, inject
from trainer.checkpoint.reading import load_checkpoint
from trainer.checkpoint.resume import resolve_resume_checkpoint

pytestmark = [pytest.mark.slow, pytest.mark.dist]

TORCHRUN_ENV = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}

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


def assert_complete_in_bucket(folder: str, names: set[str], local: Path) -> None:
    """``folder`` (a prefix) holds the checkpoints ``names`` and nothing else, each with every file that
    ``local`` (the same strategy's checkpoint on local disk) has: one object, or a DeepSpeed folder's
    files with its ``latest`` tag and each of the two ranks' optimizer partitions."""
    assert {object_store.basename(entry["url"]) for entry in object_store.list_entries(folder)} == names
    files = {p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file()} if local.is_dir() else {""}
    if local.is_dir():
        partitions = {f"checkpoint/zero_pp_rank_{rank}_mp_rank_00_optim_states.pt" for rank in (0, 1)}
        assert {"latest", "checkpoint/mp_rank_00_model_states.pt", *partitions} <= files
    for name in names:
        assert set(object_store.object_infos(f"{folder}/{name}")) == files, name


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


@pytest.mark.parametrize(
    ("strategy", "signal", "ranks"), [("ddp", "SIGTERM", [1]), ("deepspeed_stage_2", "SIGUSR1", [0, 1])]
)
def test_preemption_signal_checkpoints_that_step_and_the_same_command_resumes_exactly(
    uninterrupted, latent_dir, tmp_path, strategy, signal, ranks, s3_bucket
):
    """The signal comes at a micro-batch drawn from a seed, to ``ranks`` only: every rank finishes that optimizer
    step, one checkpoint of it is written, all exit 75; the same command line then finishes the run exactly.
    The checkpoints go to a bucket (``callbacks.model_checkpoint.dirpath=s3://...``) and the resume comes
    from there (downloaded to ``checkpoint-cache``): every checkpoint complete in the bucket, none on local disk."""
    rng = random.Random(f"{strategy}-15")
    step, micro = rng.randrange(STEPS - 1), rng.randrange(2)
    out, checkpoints = tmp_path / "run", f"{s3_bucket}/run/checkpoints"
    command = [
        *two_process_overrides(latent_dir, out, strategy, STEPS),
        EMA,
        KEEP_ALL,
        "auto_resume=true",
        f"callbacks.model_checkpoint.dirpath={checkpoints}",
        *inject("signal", "SignalAt", marker=out / "sent", step=step, micro=micro, signal=signal, ranks=ranks),
    ]
    preempted = run_cli("lf-train", *command, cwd=tmp_path, env=FAULTS_ENV)
    assert preempted.returncode == 75, preempted.stdout[-2000:] + preempted.stderr[-3000:]
    assert f"preempted by {signal} at step {step + 1}" in preempted.stdout
    local = step_checkpoint(uninterrupted(strategy), 2)  # what a save of this strategy writes
    saved = {f"step-{s:07d}.ckpt" for s in range(2, step + 2) if s % 2 == 0 or s == step + 1}
    assert_complete_in_bucket(checkpoints, {*saved, "last.ckpt"}, local)
    assert not list((out / "checkpoint-staging").iterdir()) and not (out / "checkpoints").exists()
    resumable = resolve_resume_checkpoint("last", checkpoints, tmp_path / "cache")
    assert Path(resumable).name == "last.ckpt" and load_checkpoint(resumable)["global_step"] == step + 1

    resumed = run_cli("lf-train", *command, cwd=tmp_path, env=FAULTS_ENV)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"at step {step + 1}" in resumed.stdout and "resumed from" in resumed.stdout
    assert f"resume: from {checkpoints}/last.ckpt" in resumed.stdout + resumed.stderr
    saved |= {f"step-{s:07d}.ckpt" for s in range(step + 2, STEPS + 1) if s % 2 == 0 or s == STEPS}
    assert_complete_in_bucket(checkpoints, {*saved, "last.ckpt"}, local)
    assert not list((out / "checkpoint-staging").iterdir()) and not (out / "checkpoints").exists()
    assert list((out / "checkpoint-cache").iterdir()) == [], "the resumed copy is removed"
    last = cached_copy(f"{checkpoints}/last.ckpt", tmp_path / "cache")
    assert_resume_is_exact(last, step_checkpoint(uninterrupted(strategy), STEPS))


def test_torchrun_restarts_after_a_killed_rank_and_a_hung_rank_and_matches(uninterrupted, latent_dir, tmp_path):
    """torchrun --max-restarts=2, the same command throughout. Rank 0 samples validation images longer than
    ``distributed.timeout_s`` at step 2: rank 1 waits, nothing trips. Rank 1 is SIGKILLed in step 3: the group
    restarts from step 2. Rank 1 hangs in validation at step 4: its watchdog stops it within the timeout,
    naming rank and phase, and the group restarts from step 4. The run ends equal to an uninterrupted one."""
    out, timeout = tmp_path / "run", 15
    command = [
        *two_process_overrides(latent_dir, out, "ddp", STEPS),
        EMA,
        KEEP_ALL,
        "auto_resume=true",
        f"distributed.timeout_s={timeout}",
        f"data.val_dir={latent_dir}",
        "trainer.val_check_interval=4",  # batches: every 2 optimizer steps
        "+trainer.check_val_every_n_epoch=null",
        "+trainer.limit_val_batches=2",
        "callbacks=with_validation_images",
        "callbacks.validation_images._target_=tests.integration.faults.SlowValidationImages",
        f"+callbacks.validation_images.marker={out / 'slow-images'}",
        f"+callbacks.validation_images.extra_s={timeout + 5}",
        "callbacks.validation_images.prompts=[a handwritten digit one]",
        "callbacks.validation_images.every_n_steps=2",
        "callbacks.validation_images.images_per_prompt=1",
        "callbacks.validation_images.steps=2",
        *inject("kill", "KillAt", marker=out / "killed", step=2, ranks=[1]),
        *inject("stall", "StallValidation", marker=out / "stalled", step=4, seconds=3600, ranks=[1]),
    ]
    # as launch/torchrun_*.sh: a restarted group must not read the previous attempt's addresses (pytorch#135712)
    argv, env = cli_command("lf-train", *command, cwd=tmp_path, env={**FAULTS_ENV, **TORCHRUN_ENV})
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--max-restarts=2"]
    result = subprocess.run(
        [*torchrun, "-m", "trainer.cli.train", *argv[1:]], cwd=tmp_path, env=env, capture_output=True, text=True,
        timeout=900,  # an upper bound for a hang, not a timing
    )  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert (out / "killed").exists() and (out / "stalled").exists(), "both faults happened"
    assert "hang: rank 1 made no progress for" in output and "in 'validation' at step 4" in output
    assert "resumed from" in output and "at step 2" in output and "at step 4" in output
    assert_resume_is_exact(out / "checkpoints" / "last.ckpt", step_checkpoint(uninterrupted("ddp"), STEPS))
