"""Precision and memory options build and train: gradient checkpointing, channels_last,
torch.compile of the UNet, bf16 autocast, foreach/fused AdamW and gradient clipping, together, on the tiny model."""

import numpy as np
import pytest
import torch
from hydra.utils import instantiate

from tests.conftest import compose_config, tiny_train_overrides
from trainer.cli.hydra_app import optimizer_factories
from trainer.cli.train import run_train

pytestmark = pytest.mark.slow

OPTIONS = [
    "model.gradient_checkpointing=true",
    "model.channels_last=true",
    "model.compile_unet=true",
    "model.compile_options={backend:eager}",  # the compile path without a C++ build (inductor is the default)
    "optim.foreach=true",  # fused=true also works, without gradient clipping (Lightning refuses to clip then)
    "trainer.precision=bf16-mixed",
    "trainer.gradient_clip_val=0.5",
]


def test_options_reach_the_unet_and_optimizer(tmp_path):
    cfg = compose_config("train", ["data.train_dir=x", f"output_dir={tmp_path}", *OPTIONS])
    module = instantiate(cfg.model, **optimizer_factories(cfg), uncond_text=None, caption_dropout=0.0)
    assert module.unet.is_gradient_checkpointing
    assert module.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert module.unet._compiled_call_impl is not None, "nn.Module.compile() in place"
    assert all(not k.startswith("unet._orig_mod") for k in module.state_dict()), "parameter names unchanged"
    optimizer = module.configure_optimizers()
    optimizer = optimizer["optimizer"] if isinstance(optimizer, dict) else optimizer
    assert optimizer.defaults["foreach"] is True
    fused = optimizer_factories(compose_config("train", ["data.train_dir=x", "output_dir=o", "optim.fused=true"]))[
        "optimizer"
    ]
    assert fused(params=[torch.nn.Parameter(torch.zeros(2))]).defaults["fused"] is True


def test_all_options_train_two_steps(latent_dir, tmp_path):
    metrics = run_train(compose_config("train", [*tiny_train_overrides(latent_dir, tmp_path, steps=2), *OPTIONS]))
    assert metrics["global_step"] == 2 and np.isfinite(metrics["train/loss"])
