"""The memory plan (``lf-train plan=true``): its weights, gradients and optimizer state equal the bytes a real run
of the tiny UNet holds after one optimizer step (sums of tensor sizes: exact), its activations are within the
stated tolerance of a measured CPU peak, an over-budget run names what to shrink, and the command prints the
plan of an SDXL-sized run on the meta device without data and without training.
"""

from __future__ import annotations

import importlib.util
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

from lf_common.errors import ConfigError
from tests.unit.tiny_lightning import bare_trainer
from trainer.callbacks.ema import EMA
from trainer.cli.hydra_app import compose_config, optimizer_factories
from trainer.cli.plan_run import log_plan, meta_module, plan_context, plan_of, run_plan, run_setup, step_activations
from trainer.cli.train import run_train
from trainer.cli.train_autoencoder import run_train_autoencoder
from trainer.memory.measure import LiveBytes
from trainer.memory.report import fixes
from trainer.memory.tensors import held_bytes

ACTIVATION_TOLERANCE = 0.10
"""docs/memory.md: without gradient checkpointing, within 10% of the measured peak of the forward pass."""


def plan_config(*overrides: str):
    return compose_config("train", ["plan.enabled=true", "callbacks.ema=null", *overrides])


def one_step(module) -> torch.optim.Optimizer:
    """One optimizer step of ``module``'s UNet on random inputs (the state exists from then)."""
    optimizer = module.configure_optimizers()
    optimizer = optimizer["optimizer"] if isinstance(optimizer, dict) else optimizer
    unet = module.unet
    dtype = next(unet.parameters()).dtype
    config = unet.config
    out = unet(
        torch.randn(2, 4, 8, 8, dtype=dtype),
        torch.randint(0, 1000, (2,)),
        encoder_hidden_states=torch.randn(2, 77, config.cross_attention_dim, dtype=dtype),
    ).sample
    out.float().pow(2).mean().backward()
    if hasattr(optimizer, "train"):
        optimizer.train()  # schedule-free
    optimizer.step()
    return optimizer


CASES = [
    ("optim=adamw",),
    ("optim=adamw", "trainer.precision=bf16-true"),
    ("optim=adamw", "experiment=lora"),
    ("optim=adafactor",),
    ("optim=lion",),
    ("optim=schedule_free_adamw", "lr_scheduler=constant"),
    pytest.param(
        "optim=adamw8bit",
        marks=pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes"),
    ),
]


@pytest.mark.parametrize("overrides", CASES, ids=lambda o: " ".join(o) if isinstance(o, tuple) else o)
def test_weights_gradients_and_optimizer_state_equal_the_bytes_a_step_holds(overrides):
    overrides = (overrides,) if isinstance(overrides, str) else overrides
    cfg = plan_config(*overrides, "plan.batch_size=1")
    planned, _ = plan_of(cfg, meta_module(cfg))
    module = instantiate(cfg.model, **optimizer_factories(cfg, param_groups=True))
    if "trainer.precision=bf16-true" in overrides:
        module.to(torch.bfloat16)
    held = held_bytes(module, one_step(module))
    assert held["optimizer state"] > 0
    for part in ("weights", "gradients", "optimizer state"):
        assert planned.parts[part] == held[part], (part, planned.parts[part], held[part])


def test_prodigy_state_is_bounded_by_the_plan_by_one_element_per_all_zero_tensor():
    cfg = plan_config("optim=prodigy", "plan.batch_size=1")
    planned, _ = plan_of(cfg, meta_module(cfg))
    module = instantiate(cfg.model, **optimizer_factories(cfg, param_groups=True))
    zero = [p for p in module.parameters() if not p.any()]  # p0 of an all-zero tensor is one element
    held = held_bytes(module, one_step(module))
    assert held["optimizer state"] == planned.parts["optimizer state"] - 4 * sum(p.numel() - 1 for p in zero)


def test_lora_plans_gradients_state_and_ema_for_the_adapters_only_and_the_callback_holds_that_ema():
    full, _ = plan_of(cfg := compose_config("train", ["plan.enabled=true"]), meta_module(cfg))  # the EMA is on
    lora_cfg = compose_config("train", ["plan.enabled=true", "experiment=lora"])
    lora, lora_context = plan_of(lora_cfg, meta_module(lora_cfg))
    assert lora.trainable_numel < full.trainable_numel / 10
    assert lora.parts["gradients"] == 4 * lora.trainable_numel
    assert full.parts["EMA"] == 4 * full.numel and full.trainable_numel == full.numel  # a full fine-tune: every weight
    assert lora.parts["EMA"] == 4 * lora.trainable_numel  # the adapters; the frozen base is not copied
    module = instantiate(lora_cfg.model, **optimizer_factories(lora_cfg, param_groups=True))
    ema, trainer = EMA(), bare_trainer(max_steps=1)
    ema.setup(trainer, module, "fit")
    ema.on_fit_start(trainer, module)
    assert held_bytes(module, averaged=ema.average)["EMA"] == lora.parts["EMA"]
    host_cfg = compose_config("train", ["plan.enabled=true", "experiment=lora", "callbacks.ema.device=cpu"])
    on_host, host_context = plan_of(host_cfg, module)
    assert on_host.parts["EMA"] == 0 and on_host.host["EMA"] == lora.parts["EMA"]  # callbacks.ema.device=cpu
    assert fixes("EMA", lora_context) == ["callbacks.ema=null", "callbacks.ema.device=cpu"]
    assert fixes("EMA", host_context) == ["callbacks.ema=null"]


def test_activation_estimate_is_within_the_tolerance_of_the_measured_peak_of_a_forward_pass():
    batch, side = 16, 16
    cfg = plan_config(f"plan.batch_size={batch}", f"plan.latent_size={side}")
    meta = meta_module(cfg)
    estimate = step_activations(meta, plan_context(cfg, meta, run_setup(cfg)))
    unet = instantiate(cfg.model, optimizer=None, lr_scheduler=None).unet
    inputs = (torch.randn(batch, 4, side, side), torch.randint(0, 1000, (batch,)), torch.randn(batch, 77, 32))
    with LiveBytes() as forward:  # what the forward pass holds for the backward, and its transients
        out = unet(*inputs[:2], encoder_hidden_states=inputs[2]).sample
    assert forward.held > 0 and out.requires_grad
    assert abs(estimate - forward.peak) <= ACTIVATION_TOLERANCE * forward.peak, (estimate, forward.peak)


def test_an_over_budget_run_names_the_part_to_shrink_and_how(capsys):
    cfg = plan_config("plan.batch_size=1", "plan.device_memory_gb=0.001")
    result = run_plan(cfg)
    out = capsys.readouterr().out
    assert result["fits"] is False and "does NOT fit in 0.001 GiB" in out
    assert "shrink optimizer state" in out and "optim=adamw8bit" in out  # AdamW's state: the largest part
    cfg = plan_config("plan.batch_size=1", "plan.device_memory_gb=1")
    assert run_plan(cfg)["fits"] is True and "shrink" not in capsys.readouterr().out


def test_a_dreambooth_recipe_plans_from_the_standard_configs_without_weights_or_data():
    cfg = compose_config(
        "train", ["plan.enabled=true", "experiment=dreambooth_lora_text_encoder", "plan.base=sd1", "plan.latent_size=8"]
    )
    module = meta_module(cfg)
    assert module.text_encoder.device.type == "meta" and module.unet.device.type == "meta"
    adapters = sum(p.numel() for n, p in module.named_parameters() if "lora" in n)
    planned, _ = plan_of(cfg, module)
    assert adapters > 0 and planned.trainable_numel == adapters  # the adapters on the UNet and the text encoder
    assert planned.numel > 980e6  # SD 1.x's UNet (860 M) and CLIP ViT-L text encoder (123 M), frozen


def test_a_plan_is_for_the_run_s_device_not_this_machine():
    cfg = plan_config("trainer.accelerator=gpu", "trainer.precision=16-mixed", "plan.batch_size=1")
    planned = run_train(cfg)["plan"]  # 16-mixed is refused for a run on a CPU, not for its plan
    assert planned.parts["weights"] == 4 * planned.numel  # autocast keeps float32 weights


def test_a_run_logs_the_plan_of_its_own_module(caplog):
    cfg = plan_config("plan.batch_size=2")
    module = instantiate(cfg.model, **optimizer_factories(cfg, param_groups=True))
    with caplog.at_level(logging.INFO, logger="trainer.cli.plan_run"):
        log_plan(cfg, module)
    printed = run_plan(cfg)["table"]
    logged = [r.getMessage() for r in caplog.records if r.name == "trainer.cli.plan_run"]
    assert logged == [printed]  # the real module's figures equal the meta one's


def test_lf_train_autoencoder_refuses_per_part_learning_rates():
    cfg = compose_config("train_autoencoder", ["data.shards=x", "optim.unet_lr=1e-4", "optim.block_lr=[1e-4]"])
    with pytest.raises(ConfigError, match=r"^optim.unet_lr, optim.block_lr: lf-train-autoencoder trains the VAE"):
        run_train_autoencoder(cfg)


def test_sharding_divides_what_each_zero_stage_shards():
    tiny = plan_config()
    single, _ = plan_of(tiny, module := meta_module(tiny))
    for stage, sharded in ((1, {"optimizer state"}), (2, {"optimizer state", "gradients"})):
        cfg = plan_config(f"strategy=deepspeed_stage_{stage}", "plan.world_size=4")
        zero, _ = plan_of(cfg, module)
        assert zero.parts["master weights"] == -(-4 * single.trainable_numel // 4)
        for part in sharded:
            assert zero.parts[part] <= -(-single.parts[part] // 4) + 4
        assert zero.parts["weights"] == single.parts["weights"]


def test_lf_train_plan_prints_an_sdxl_plan_without_data_or_training(tmp_path):
    result = subprocess.run(
        [str(Path(sys.executable).with_name("lf-train")), "plan=true", "experiment=sdxl_full_24gb", "plan.base=sdxl",
         "plan.device_memory_gb=24", f"output_dir={tmp_path}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2567.5 M of 2567.5 M parameters trained" in result.stdout, result.stdout
    assert "fits in 24 GiB" in result.stdout
    assert not (tmp_path / "checkpoints").exists()
    assert "optimizer bitsandbytes" in result.stdout  # the recipe's 8-bit AdamW, planned without bitsandbytes
