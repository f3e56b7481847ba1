"""Two CPU processes over gloo: DDP and DeepSpeed ZeRO-2, through ``lf-train``."""

import pytest

from tests.conftest import compose_config
from tests.integration.cli import run_cli
from trainer.cli.export import run_export
from trainer.export import load_checkpoint

pytestmark = [pytest.mark.slow, pytest.mark.dist]


def two_process_overrides(latent_dir, out, strategy):
    return [
        f"strategy={strategy}",
        "trainer.devices=2",
        "trainer.accelerator=cpu",
        f"data.train_dir={latent_dir}",
        f"output_dir={out}",
        "trainer.max_steps=4",
        "data.batch_size=8",
        "data.num_workers=0",
        "trainer.log_every_n_steps=1",
        "trainer.enable_progress_bar=false",
        "callbacks.model_checkpoint.every_n_train_steps=2",
    ]


def test_ddp_on_two_cpu_processes(latent_dir, tmp_path):
    result = run_cli("lf-train", *two_process_overrides(latent_dir, tmp_path / "run", "ddp"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "training done at step 4" in result.stderr + result.stdout
    assert (tmp_path / "hydra" / "train_ddp_process_1.log").is_file(), "a second process ran"
    checkpoint = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert checkpoint["global_step"] == 4
    metrics = (tmp_path / "run" / "csv" / "version_0" / "metrics.csv").read_text()
    assert "data/skipped_samples" in metrics.splitlines()[0], "the skip count, summed over ranks, is logged"


def test_deepspeed_zero2_on_two_cpu_processes_then_export(latent_dir, tmp_path):
    result = run_cli(
        "lf-train", *two_process_overrides(latent_dir, tmp_path / "run", "deepspeed_stage_2"), cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert {p.name for p in (last / "checkpoint").iterdir()} >= {
        "zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "zero_pp_rank_1_mp_rank_00_optim_states.pt",
    }, "optimizer state is partitioned over the two ranks"
    export = run_export(compose_config("export", [f"ckpt_path={last}", f"out_dir={tmp_path / 'export'}"]))
    assert (tmp_path / "export" / "unet" / "diffusion_pytorch_model.safetensors").is_file(), export
