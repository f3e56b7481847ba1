"""Two CPU processes over gloo: DDP and DeepSpeed ZeRO 1/2/3, through ``lf-train``, with gradient
accumulation 2; exact resume under DDP and ZeRO-2."""

import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file

from tests.conftest import compose_config
from tests.integration.cli import run_cli
from trainer.cli.export import run_export
from trainer.export import load_checkpoint

pytestmark = [pytest.mark.slow, pytest.mark.dist]


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
    """Tensors equal bit for bit, everything else equal, through dicts, lists and tuples."""
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


def assert_resume_is_exact(resumed: dict, uninterrupted: dict) -> None:
    for key in ("global_step", "state_dict", "current_model_state", "optimizer_states", "lr_schedulers"):
        if key in uninterrupted:
            assert_same_nested(resumed[key], uninterrupted[key], key)
    assert resumed["LatentShardDataModule"]["batches"] == uninterrupted["LatentShardDataModule"]["batches"]


def test_ddp_on_two_cpu_processes_and_exact_resume(latent_dir, tmp_path):
    result = train(latent_dir, tmp_path / "run", "ddp", 4, cwd=tmp_path)
    assert "training done at step 4" in result.stderr + result.stdout
    assert (tmp_path / "hydra" / "train_ddp_process_1.log").is_file(), "a second process ran"
    uninterrupted = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert uninterrupted["global_step"] == 4
    assert len(uninterrupted["callbacks"]["RNGState"]["ranks"]) == 2, "each rank's RNG states are saved"
    metrics = (tmp_path / "run" / "csv" / "version_0" / "metrics.csv").read_text()
    assert "data/skipped_samples" in metrics.splitlines()[0], "the skip count, summed over ranks, is logged"
    # stopped at step 2 (4 batches a rank, mid-epoch), resumed to 4 (across the epoch's end)
    train(latent_dir, tmp_path / "stopped", "ddp", 2, cwd=tmp_path)
    train(latent_dir, tmp_path / "stopped", "ddp", 4, "ckpt_path=last", cwd=tmp_path)
    assert_resume_is_exact(load_checkpoint(tmp_path / "stopped" / "checkpoints" / "last.ckpt"), uninterrupted)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_deepspeed_zero_on_two_cpu_processes_then_export_ema(latent_dir, tmp_path, stage):
    train(latent_dir, tmp_path / "run", f"deepspeed_stage_{stage}", 4, "callbacks.ema.decay=0.5", cwd=tmp_path)
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
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
    if stage == 2:  # exact resume under ZeRO-2: weights, EMA, and each rank's optimizer partition
        stopped = tmp_path / "stopped"
        train(latent_dir, stopped, "deepspeed_stage_2", 2, "callbacks.ema.decay=0.5", cwd=tmp_path)
        train(latent_dir, stopped, "deepspeed_stage_2", 4, "callbacks.ema.decay=0.5", "ckpt_path=last", cwd=tmp_path)
        resumed_last = stopped / "checkpoints" / "last.ckpt"
        assert_resume_is_exact(load_checkpoint(resumed_last), checkpoint)
        for rank in (0, 1):
            name = f"checkpoint/zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"
            # weights_only=False on purpose: DeepSpeed pickles its own objects into these partition
            # files (it loads them the same way), and these are files this test just wrote.
            partitions = [torch.load(p / name, map_location="cpu", weights_only=False) for p in (last, resumed_last)]
            assert_same_nested(*(p["optimizer_state_dict"] for p in partitions), name)


def test_fsdp_on_two_cpu_processes_then_export_ema(latent_dir, tmp_path):
    train(latent_dir, tmp_path / "run", "fsdp", 2, "callbacks.ema.decay=0.5", cwd=tmp_path)
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    checkpoint = load_checkpoint(last)  # a full state dict, gathered to rank 0
    ema, raw = checkpoint["state_dict"], checkpoint["current_model_state"]
    assert ema["unet.conv_in.weight"].shape == raw["unet.conv_in.weight"].shape == (32, 4, 3, 3)
    assert any(not torch.equal(ema[k], raw[k]) for k in ema), "the EMA (of gathered parameters) differs"
    run_export(compose_config("export", [f"ckpt_path={last}", f"out_dir={tmp_path / 'export'}"]))
    assert (tmp_path / "export" / "unet" / "diffusion_pytorch_model.safetensors").is_file()
