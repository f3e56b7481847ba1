"""Two CPU processes over gloo: DDP and DeepSpeed ZeRO 1/2/3, through ``lf-train``, with gradient
accumulation 2; exact resume under DDP, ZeRO-2 and ZeRO-3 after a stop at ``max_steps``, and under DDP and
ZeRO-2 after the whole process group was killed (SIGKILL).

Each strategy trains once uninterrupted (module fixture), for ``STEPS`` steps with a checkpoint
every 2 steps, all kept: every interrupted-and-resumed run is compared with the checkpoint of the
same step.
"""

from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file

from tests.conftest import compose_config
from tests.integration.cli import kill_cli_when, run_cli
from trainer.checkpointing import resolve_resume_checkpoint
from trainer.cli.export import run_export
from trainer.export import load_checkpoint

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


def assert_same_nested(a, b, where="checkpoint"):
    """Tensors equal bit for bit, everything else equal, through dicts, lists, tuples and objects' attributes."""
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_same_nested(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same_nested(x, y, f"{where}[{i}]")
    elif isinstance(a, (int, float, str, bytes, type(None))):
        assert a == b, f"{where}: {a!r} != {b!r}"
    else:  # an object DeepSpeed pickles into its partition files (its loss scaler): its attributes
        assert type(a) is type(b), where
        assert_same_nested(vars(a), vars(b), f"{where}.{type(a).__name__}")


def assert_resume_is_exact(resumed: Path, uninterrupted: Path) -> None:
    """Two checkpoints (files or DeepSpeed folders) hold the same training state, bit for bit.

    Weights, EMA, optimizer state (under ZeRO: each rank's partition), LR schedule, step and
    data position.
    """
    a, b = load_checkpoint(resumed), load_checkpoint(uninterrupted)
    for key in ("global_step", "state_dict", "current_model_state", "optimizer_states", "lr_schedulers"):
        if key in b:
            assert_same_nested(a[key], b[key], key)
    assert a["LatentShardDataModule"]["batches"] == b["LatentShardDataModule"]["batches"]
    partitions = sorted(p.name for p in (uninterrupted / "checkpoint").glob("zero_pp_rank_*_optim_states.pt"))
    assert uninterrupted.is_file() or len(partitions) == 2, "a ZeRO checkpoint holds each rank's partition"
    for name in partitions:
        # weights_only=False on purpose: DeepSpeed pickles its own objects into these partition
        # files (it loads them the same way), and these are files this test session just wrote.
        states = [
            torch.load(p / "checkpoint" / name, map_location="cpu", weights_only=False)
            for p in (resumed, uninterrupted)
        ]
        assert_same_nested(*(state["optimizer_state_dict"] for state in states), name)


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


def test_ddp_on_two_cpu_processes_and_exact_resume(uninterrupted, latent_dir, tmp_path):
    run = uninterrupted("ddp")
    assert f"training done at step {STEPS}" in (run.parent / "hydra" / "train.log").read_text()
    assert (run.parent / "hydra" / "train_ddp_process_1.log").is_file(), "a second process ran"
    last = load_checkpoint(run / "checkpoints" / "last.ckpt")
    assert last["global_step"] == STEPS
    assert len(last["callbacks"]["RNGState"]["ranks"]) == 2, "each rank's RNG states are saved"
    metrics = (run / "csv" / "version_0" / "metrics.csv").read_text()
    assert "data/skipped_samples" in metrics.splitlines()[0], "the skip count, summed over ranks, is logged"
    # stopped at step 2 (4 batches a rank, mid-epoch), resumed to 4 (across the epoch's end)
    train(latent_dir, tmp_path / "stopped", "ddp", 2, EMA, cwd=tmp_path)
    train(latent_dir, tmp_path / "stopped", "ddp", 4, EMA, "ckpt_path=last", cwd=tmp_path)
    assert_resume_is_exact(tmp_path / "stopped" / "checkpoints" / "last.ckpt", step_checkpoint(run, 4))


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_deepspeed_zero_on_two_cpu_processes_then_export_ema(uninterrupted, latent_dir, tmp_path, stage):
    run = uninterrupted(f"deepspeed_stage_{stage}")
    last = run / "checkpoints" / "last.ckpt"
    assert {p.name for p in (last / "checkpoint").iterdir()} >= {
        "zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "zero_pp_rank_1_mp_rank_00_optim_states.pt",
    }, "optimizer state is partitioned over the two ranks"
    checkpoint = load_checkpoint(last)
    ema, raw = checkpoint["state_dict"], checkpoint["current_model_state"]
    assert ema.keys() == raw.keys() and any(k.startswith("unet.") for k in ema)
    assert any(not torch.equal(ema[k], raw[k]) for k in ema), "the EMA differs from the raw weights"
    run_export(compose_config("export", [f"ckpt_path={last}", f"out_dir={tmp_path / 'export'}"]))
    exported = load_file(tmp_path / "export" / "unet" / "diffusion_pytorch_model.safetensors")
    assert exported.keys() == {k.removeprefix("unet.") for k in ema}
    assert all(torch.equal(exported[k.removeprefix("unet.")], ema[k]) for k in ema), "export holds the EMA weights"
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "export", local_files_only=True)
    assert tuple(pipe.unet.config.block_out_channels) == (32, 64)
    if stage in (2, 3):  # exact resume under ZeRO-2 and 3: weights, EMA, and each rank's optimizer partition
        stopped = tmp_path / "stopped"
        train(latent_dir, stopped, f"deepspeed_stage_{stage}", 2, EMA, cwd=tmp_path)
        train(latent_dir, stopped, f"deepspeed_stage_{stage}", 4, EMA, "ckpt_path=last", cwd=tmp_path)
        assert_resume_is_exact(stopped / "checkpoints" / "last.ckpt", step_checkpoint(run, 4))


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


def test_fsdp_on_two_cpu_processes_then_export_ema(latent_dir, tmp_path):
    train(latent_dir, tmp_path / "run", "fsdp", 2, "callbacks.ema.decay=0.5", cwd=tmp_path)
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    checkpoint = load_checkpoint(last)  # a full state dict, gathered to rank 0
    ema, raw = checkpoint["state_dict"], checkpoint["current_model_state"]
    assert ema["unet.conv_in.weight"].shape == raw["unet.conv_in.weight"].shape == (32, 4, 3, 3)
    assert any(not torch.equal(ema[k], raw[k]) for k in ema), "the EMA (of gathered parameters) differs"
    run_export(compose_config("export", [f"ckpt_path={last}", f"out_dir={tmp_path / 'export'}"]))
    assert (tmp_path / "export" / "unet" / "diffusion_pytorch_model.safetensors").is_file()
