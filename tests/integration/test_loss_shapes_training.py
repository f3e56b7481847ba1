"""A short lf-train run with kohya's scheduled Huber loss and multires noise: the switches reach the
objective through the config, the loss stays finite, and the weights move."""

import pytest
import torch

from tests.conftest import compose_config, tiny_train_overrides
from trainer.cli.train import run_train

pytestmark = pytest.mark.slow


def test_huber_snr_with_multires_noise_trains(latent_dir, tmp_path):
    overrides = [
        *tiny_train_overrides(latent_dir, tmp_path, steps=4),
        "objective=huber_snr",
        "model.objective.multires_noise_iterations=4",
        "model.objective.multires_noise_discount=0.4",
    ]
    cfg = compose_config("train", overrides)
    assert cfg.model.objective.loss_type == "huber" and cfg.model.objective.huber_schedule == "snr"
    metrics = run_train(cfg)
    assert metrics["global_step"] == 4
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))

    def unet(step):
        state = torch.load(tmp_path / "checkpoints" / f"step-{step:07d}.ckpt", weights_only=True)["state_dict"]
        return {k: v for k, v in state.items() if k.startswith("unet.")}

    second, fourth = unet(2), unet(4)
    moved = [k for k in second if not torch.equal(second[k], fourth[k])]
    assert len(moved) > len(second) // 2, "most UNet tensors change between steps 2 and 4"
    assert all(torch.isfinite(v).all() for v in fourth.values())
