"""The memory plan (``lf-train plan=true``) against what a CPU training step actually holds.

For the tiny UNet (``model=tiny``) and an SD-1.5-shaped one (``model=sd15``: SD 1.5's architecture, 860 M
parameters, random weights; ``bf16-true`` and small latents so that it fits this machine in minutes), the plan is
computed on the meta device as ``lf-train plan=true`` does, then the real module takes two optimizer steps:

* weights, gradients, optimizer state: sums of the actual tensors' sizes after the steps (exact: the plan
  must give the same bytes);
* activations: the peak a forward pass allocates (:class:`trainer.memory.measure.LiveBytes`, storage by storage);
* total: the second step's peak (weights and optimizer state held, plus the step's own allocations), against the
  plan's total, which adds every part (gradients exist only from the backward pass on, while activations are
  freed: the plan is an upper bound there);
* EMA: the plan's EMA part (the run with ``callbacks.ema`` on) against the bytes the EMA callback holds once fit
  starts (exact), and, side by side, what the earlier callback held: Lightning's ``WeightAveraging``, a
  ``torch.optim.swa_utils.AveragedModel`` copy of the whole module (``sd15-lora``: LoRA on the SD-1.5-shaped UNet
  shows the difference).

On a GPU (``--device cuda``, bench/gpu_checks.sh's ``memplan`` part) the peaks are
``torch.cuda.max_memory_allocated`` above what was allocated before, and the SD-1.5-shaped UNet also runs at
512 px (batch 4); without CUDA that prints one line and exits 0.

Usage::

    python bench/memory_plan.py                    # tiny, then SD-1.5-shaped (a few minutes on 2 cores)
    python bench/memory_plan.py --models tiny
    python bench/memory_plan.py --models sd15-lora     # the EMA of a LoRA run: adapters only, vs a module copy
    python bench/memory_plan.py --device cuda --models tiny,sd15,sd15-512,sd15-512-checkpointing
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import time
from collections.abc import Iterator

import lightning as L
import torch
from hydra.utils import instantiate
from torch.optim.swa_utils import AveragedModel

from trainer.callbacks.ema import EMA
from trainer.cli.hydra_app import compose_config, optimizer_factories
from trainer.cli.plan_run import meta_module, plan_of, run_setup
from trainer.memory.measure import LiveBytes
from trainer.memory.plan import memory_plan
from trainer.memory.report import gib
from trainer.memory.tensors import held_bytes, model_tensors

MODELS = {
    "tiny": (["model=tiny", "trainer.precision=32-true"], 16, 16),
    "sd15": (["model=sd15", "trainer.precision=bf16-true", "model.compile_unet=false"], 1, 16),
    "sd15-checkpointing": (
        ["model=sd15", "trainer.precision=bf16-true", "model.compile_unet=false", "model.gradient_checkpointing=true"],
        1,
        16,
    ),
    "sd15-lora": (["model=sd15", "experiment=lora", "trainer.precision=bf16-true", "model.compile_unet=false"], 1, 16),
    "sd15-512": (["model=sd15", "trainer.precision=bf16-true", "model.compile_unet=false"], 4, 64),
    "sd15-512-checkpointing": (
        ["model=sd15", "trainer.precision=bf16-true", "model.compile_unet=false", "model.gradient_checkpointing=true"],
        4,
        64,
    ),
}


class Peak:
    """The peak of new allocations in a ``peak_of`` block (``value``) and what it still holds at the end (``held``)."""

    value = 0
    held = 0


@contextlib.contextmanager
def peak_of(device: torch.device) -> Iterator[Peak]:
    """Measure the block's allocations: storage by storage on the CPU (:class:`LiveBytes`), with the caching
    allocator's statistics on CUDA (``torch.cuda.max_memory_allocated`` above the memory allocated before)."""
    peak = Peak()
    if device.type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        yield peak
        torch.cuda.synchronize()
        peak.value = torch.cuda.max_memory_allocated() - before
        peak.held = torch.cuda.memory_allocated() - before
        return
    with LiveBytes() as live:
        yield peak
    peak.value, peak.held = live.peak, live.held


def inputs(unet: torch.nn.Module, batch: int, side: int) -> tuple[torch.Tensor, ...]:
    """Random ``x_t`` ``(B, 4, side, side)``, timesteps ``(B,)`` and text ``(B, 77, D)`` on the UNet's device."""
    weight = next(unet.parameters())
    text = torch.randn(batch, 77, unet.config.cross_attention_dim, dtype=weight.dtype, device=weight.device)
    noisy = torch.randn(batch, 4, side, side, dtype=weight.dtype, device=weight.device)
    return noisy, torch.randint(0, 1000, (batch,), device=weight.device), text


def step(unet: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: int, side: int) -> int:
    """One optimizer step on random inputs; returns the forward pass's peak of new allocations."""
    noisy, timesteps, text = inputs(unet, batch, side)
    with peak_of(noisy.device) as forward:
        out = unet(noisy, timesteps, text).sample
    out.float().pow(2).mean().backward()
    del out
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return forward.value


def measure(name: str, device: torch.device) -> tuple[list[tuple[str, int, int]], int]:
    """Plan and measurement of one model: rows of (part, planned bytes, measured bytes), and the bytes the earlier
    EMA callback held for it."""
    overrides, batch, side = MODELS[name]
    cfg = compose_config(
        "train",
        ["plan.enabled=true", "callbacks.ema=null", f"plan.batch_size={batch}", f"plan.latent_size={side}", *overrides],
    )
    planned, _ = plan_of(cfg, meta_module(cfg))
    module = instantiate(cfg.model, **optimizer_factories(cfg, param_groups=True))
    module.to(device, torch.bfloat16 if cfg.trainer.precision == "bf16-true" else torch.float32)
    optimizer = module.configure_optimizers()
    optimizer = optimizer["optimizer"] if isinstance(optimizer, dict) else optimizer
    unet = module.unet
    step(unet, optimizer, batch, side)  # the optimizer state exists from the first step on
    unet(*inputs(unet, 1, 8)).sample.float().sum().backward()
    held = held_bytes(module, optimizer)  # gradients of a step, before zero_grad
    optimizer.zero_grad(set_to_none=True)
    before = held["weights"] + held["optimizer state"]
    with peak_of(device) as second:
        activations = step(unet, optimizer, batch, side)
    rows = [(part, planned.parts[part], held[part]) for part in ("weights", "gradients", "optimizer state")]
    rows.append(("activations", planned.parts["activations"], activations))
    rows.append(("total (step peak)", planned.total, before + second.value))
    rows.append(("EMA", *ema_bytes(cfg, module, device)))
    return rows, earlier_ema_bytes(module)


def ema_bytes(cfg, module: L.LightningModule, device: torch.device) -> tuple[int, int]:
    """The plan's EMA part for this run with the EMA on, and the bytes the EMA callback holds once fit starts."""
    planned = memory_plan(model_tensors(module), dataclasses.replace(run_setup(cfg), ema=True), 0).parts["EMA"]
    callback, trainer = EMA(), L.Trainer(accelerator=device.type, devices=1, logger=False, enable_checkpointing=False)
    callback.setup(trainer, module, "fit")
    callback.on_fit_start(trainer, module)
    return planned, held_bytes(module, averaged=callback.average)["EMA"]


def earlier_ema_bytes(module: L.LightningModule) -> int:
    """What the earlier EMA callback held: Lightning's ``WeightAveraging`` copy of the whole module (float32, as
    built, before a ``*-true`` precision cast), buffers included."""
    copy = AveragedModel(module.float(), use_buffers=True)
    return held_bytes(copy.module)["weights"] + sum(b.untyped_storage().nbytes() for b in copy.module.buffers())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="tiny,sd15,sd15-checkpointing")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("memory_plan: skipped: no CUDA device")
        return
    device = torch.device(args.device)
    torch.manual_seed(0)
    where = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(f"| model ({where}) | batch, latents | part | plan | measured | plan / measured | bytes equal |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name in args.models.split(","):
        started = time.perf_counter()
        _, batch, side = MODELS[name]
        rows, earlier = measure(name, device)
        for part, planned, measured in rows:
            ratio = planned / measured if measured else float("nan")
            equal = "yes" if planned == measured else "no"
            cells = [name, f"{batch}, {side}x{side}", part, gib(planned), gib(measured), f"{ratio:.3f}", equal]
            print("| " + " | ".join(cells) + " |", flush=True)
        ema = rows[-1][2]
        print(
            f"({name}: EMA {gib(ema)}, the earlier whole-module copy {gib(earlier)}: {ema / earlier:.4f}x; "
            f"{time.perf_counter() - started:.0f} s)",
            flush=True,
        )


if __name__ == "__main__":
    main()
