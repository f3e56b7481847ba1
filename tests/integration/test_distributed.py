"""Two CPU processes over gloo: DDP and DeepSpeed ZeRO 1/2/3, through ``lf-train``."""

import pytest
import torch
from safetensors.torch import load_file

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
    assert (tmp_path / "run" / "csv" / "version_0" / "metrics.csv").is_file()


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_deepspeed_zero_on_two_cpu_processes_then_export_ema(latent_dir, tmp_path, stage):
    overrides = two_process_overrides(latent_dir, tmp_path / "run", f"deepspeed_stage_{stage}")
    result = run_cli("lf-train", *overrides, "callbacks.ema.decay=0.5", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
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
