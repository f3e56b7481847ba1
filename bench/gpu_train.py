"""Training throughput on a GPU: ``lf-train``'s configurations vs a plain PyTorch + diffusers loop.

The plain loop is what a user writes from diffusers' ``train_text_to_image.py`` on precomputed
latents: ``UNet2DConditionModel`` from the same config, AdamW (fused on CUDA), bf16 autocast, DDPM
noise, MSE on epsilon, backward, step, uncompiled. The contenders are the ``Trainer`` that
``lf-train`` builds from ``conf/train.yaml`` with ``model=<model>``: ``single`` (one device, UNet not
compiled), ``compiled`` (the default GPU recipe: bf16-mixed, compiled UNet, fused AdamW, TF32),
``zero2`` and ``compiled_zero2`` (DeepSpeed ZeRO-2 on one device), and variants of the DeepSpeed
settings to choose between (``zero1``, ``zero2_no_overlap``, ``zero2_no_contiguous``,
``zero2_big_buckets``; each printed as a ratio to ``single``), and candidates for the default recipe
(``compiled_channels_last``, ``compiled_cudagraphs``: torch.compile's ``reduce-overhead`` mode; each
printed as a ratio to ``compiled``), all without EMA, checkpoints and clipping (the plain loop has
none). All read the same in-memory batches (latents ``(B, 4, R/8, R/8)`` and text ``(B, 77, 768)``,
fp16, moved to the device each step), one after another in one process.
Throughput is images/s over ``--steps`` steps after ``--warmup``; the first step's time (compilation
included) is reported apart; MFU uses the UNet's FLOPs counted once (``torch.utils.flop_counter``)
and ``--peak-tflops``; peak memory is ``torch.cuda.max_memory_allocated``.

Run: ``python bench/gpu_train.py --resolution 512 --batch 32`` (``bench/gpu_train.sh`` runs 256 and
512 px). It prints a Markdown table and each configuration's ratio to the plain loop. On a CPU, a
smoke run (dynamo's aot_eager backend stands in for inductor): ``python bench/gpu_train.py --model tiny
--accelerator cpu --precision 32-true --resolution 32 --batch 4 --steps 2 --warmup 1``.
"""

from __future__ import annotations

import argparse
import gc
import tempfile
import time
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from torch.utils.data import DataLoader, IterableDataset

from trainer.callbacks.throughput import unet_train_flops
from trainer.cli.hydra_app import build_trainer, compose_config, optimizer_factories
from trainer.diffusion.unet_kinds import sdxl_pooled_width
from trainer.strategies.gpu_defaults import apply_matmul_precision


class InMemory(IterableDataset):
    """The same batches, epoch after epoch."""

    def __init__(self, batches: list[dict[str, torch.Tensor]]) -> None:
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)


class StepTimer(L.Callback):
    """Wall clock from the start of step ``warmup`` to the end of the last step (device synced)."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.start, self.end = warmup, None, 0.0
        self.first_started, self.first_step = None, float("nan")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.first_started is None:
            _sync()
            self.first_started = time.perf_counter()
        if trainer.global_step == self.warmup and self.start is None:
            _sync()
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        _sync()
        self.end = time.perf_counter()
        if trainer.global_step == 1:
            self.first_step = self.end - self.first_started


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def pooled_dim(unet_config: Any) -> int | None:
    """SDXL's pooled text width ``P`` (the ``text_time`` embedding's input less 6 time ids), else ``None``."""
    return sdxl_pooled_width(unet_config)


def make_batches(
    batch: int, resolution: int, text_dim: int, pooled: int | None = None, count: int = 4
) -> list[dict[str, torch.Tensor]]:
    """Latent-shard batches; with ``pooled`` (SDXL) also ``pooled`` ``(B, P)`` and ``time_ids`` ``(B, 6)``
    (original size, crop top-left (0, 0) and target size, all ``resolution``)."""
    generator = torch.Generator().manual_seed(0)
    side = resolution // 8
    batches = []
    for _ in range(count):
        item = {
            "latents": torch.randn(batch, 4, side, side, generator=generator).half(),  # (B, 4, R/8, R/8)
            "text": torch.randn(batch, 77, text_dim, generator=generator).half(),  # (B, 77, D)
        }
        if pooled is not None:
            item["pooled"] = torch.randn(batch, pooled, generator=generator).half()  # (B, P)
            item["time_ids"] = torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]] * batch)  # (B, 6)
        batches.append(item)
    return batches


def plain_loop(cfg, batches, args) -> float:
    """Seconds per step of the diffusers-example loop."""
    device = torch.device("cuda" if args.accelerator == "gpu" else "cpu")
    torch.manual_seed(0)
    unet = instantiate(cfg.model.unet).to(device).train()
    if cfg.model.get("gradient_checkpointing"):  # as lf-train does for this model (SDXL at 1024 px)
        unet.enable_gradient_checkpointing()
    scheduler = instantiate(cfg.model.noise_scheduler)
    fused = {"fused": True} if device.type == "cuda" else {}
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-4, **fused)
    dtype = torch.bfloat16 if args.precision.startswith("bf16") else torch.float16
    autocast = torch.autocast(device.type, dtype=dtype, enabled=args.precision != "32-true")
    alphas = scheduler.alphas_cumprod.to(device)
    start = time.perf_counter()
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            _sync()
            start = time.perf_counter()
        batch = batches[step % len(batches)]
        latents, text = batch["latents"].to(device).float(), batch["text"].to(device).float()
        added = None
        if "pooled" in batch:  # SDXL's added conditioning, as diffusers' train_text_to_image_sdxl.py passes it
            added = {"text_embeds": batch["pooled"].to(device).float(), "time_ids": batch["time_ids"].to(device)}
        noise = torch.randn_like(latents)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],), device=device)
        a = alphas[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
        with autocast:
            prediction = unet(noisy, t, encoder_hidden_states=text, added_cond_kwargs=added).sample
        loss = torch.nn.functional.mse_loss(prediction.float(), noise)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    _sync()
    return (time.perf_counter() - start) / args.steps


ZERO = "trainer.strategy.config.zero_optimization"
CONFIGURATIONS: dict[str, tuple[str, bool, tuple[str, ...]]] = {  # name -> (strategy, compile, more overrides)
    "single": ("single", False, ()),
    "compiled": ("single", True, ()),  # the default GPU recipe: bf16-mixed, compiled UNet, fused AdamW, TF32
    "zero2": ("deepspeed_stage_2", False, ()),
    "compiled_zero2": ("deepspeed_stage_2", True, ()),
    # DeepSpeed settings to choose between on one device (item 3 of the GPU issue; PARTS=zero512):
    "zero1": ("deepspeed_stage_1", False, ()),
    "zero2_no_overlap": ("deepspeed_stage_2", False, (f"{ZERO}.overlap_comm=false",)),
    "zero2_no_contiguous": ("deepspeed_stage_2", False, (f"{ZERO}.contiguous_gradients=false",)),
    "zero2_big_buckets": (
        "deepspeed_stage_2",
        False,
        (f"{ZERO}.reduce_bucket_size=500000000", f"{ZERO}.allgather_bucket_size=500000000"),
    ),
    # Candidates for the default recipe, each kept only if faster than ``compiled`` (item 2; PARTS=recipe512):
    "compiled_channels_last": ("single", True, ("model.channels_last=true",)),  # slower uncompiled (0.92x)
    "compiled_cudagraphs": ("single", True, ("model.compile_options={mode:reduce-overhead}",)),  # CUDA graphs
}


def train_config(args, tmp: str, strategy: str, compiled: bool, more: tuple[str, ...] = ()):
    """``lf-train``'s config for one configuration, without EMA, checkpoints or clipping (the plain loop has none);
    ``more``: further overrides (DeepSpeed settings, recipe candidates; on CPU compile options give way to
    dynamo's aot_eager backend)."""
    cpu_compiled = compiled and args.accelerator == "cpu"
    return compose_config("train", [
        f"model={args.model}", "data.train_dir=unused", f"output_dir={tmp}", f"strategy={strategy}",
        f"trainer.precision={args.precision}", f"trainer.accelerator={args.accelerator}", "trainer.devices=1",
        f"trainer.max_steps={args.warmup + args.steps}", "trainer.enable_model_summary=false",
        "trainer.enable_progress_bar=false", "trainer.gradient_clip_val=null", "callbacks.ema=null",
        "callbacks.model_checkpoint=null", f"data.batch_size={args.batch}", "model.caption_dropout=0",
        "lr_scheduler=constant", "trainer.enable_checkpointing=false", f"model.compile_unet={str(compiled).lower()}",
        *(more if not cpu_compiled else [o for o in more if not o.startswith("model.compile_options=")]),
        *(["model.compile_options={backend:aot_eager}"] if cpu_compiled else []),  # inductor's modes need a GPU
    ])  # fmt: skip


def lightning_path(cfg, batches, args) -> tuple[float, float]:
    """Seconds per step of the Trainer lf-train builds, and seconds of its first step (compilation included)."""
    torch.manual_seed(0)
    uncond = torch.zeros(77, cfg.model.unet.cross_attention_dim)
    pooled = pooled_dim(cfg.model.unet)
    uncond_pooled = {"uncond_pooled": torch.zeros(pooled)} if pooled is not None else {}
    module = instantiate(cfg.model, **optimizer_factories(cfg), uncond_text=uncond, **uncond_pooled)
    timer = StepTimer(args.warmup)
    trainer = build_trainer(cfg, [timer])
    trainer.fit(module, train_dataloaders=DataLoader(InMemory(batches), batch_size=None))
    return (timer.end - timer.start) / args.steps, timer.first_step


def release() -> None:
    """Free what the previous configuration left on the device."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib() -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")


def row_cells(row: tuple[float, float, float], flops: float, args: argparse.Namespace) -> str:
    """A configuration's table cells: img/s | MFU | ms/step | first step s | peak GiB."""
    seconds, first, peak = row
    mfu = flops / seconds / (args.peak_tflops * 1e12)
    return f"{args.batch / seconds:.1f} | {mfu:.1%} | {seconds * 1e3:.1f} | {first:.1f} | {peak:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="sd15")
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--configs", default="plain,single,compiled,zero2,compiled_zero2",
                        help=f"comma-separated: plain, {', '.join(CONFIGURATIONS)}")  # fmt: skip
    parser.add_argument("--precision", default="bf16-mixed")
    parser.add_argument("--accelerator", default="gpu")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="the device's dense bf16 peak (H100 SXM: 989)")
    args = parser.parse_args()
    names = args.configs.split(",")
    rows: dict[str, tuple[float, float, float]] = {}  # name -> (seconds per step, first step, peak GiB)
    with tempfile.TemporaryDirectory() as tmp:
        base = train_config(args, tmp, "single", False)
        apply_matmul_precision(base)
        batches = make_batches(
            args.batch, args.resolution, base.model.unet.cross_attention_dim, pooled_dim(base.model.unet)
        )
        side = args.resolution // 8
        flops = unet_train_flops(dict(base.model.unet), torch.Size((args.batch, 4, side, side)),
                                 torch.Size((args.batch, 77, base.model.unet.cross_attention_dim)))  # fmt: skip
        for name in names:
            release()
            try:
                if name == "plain":
                    rows[name] = (plain_loop(base, batches, args), float("nan"), peak_gib())
                else:
                    strategy, compiled, more = CONFIGURATIONS[name]
                    step, first = lightning_path(train_config(args, tmp, strategy, compiled, more), batches, args)
                    rows[name] = (step, first, peak_gib())
            except torch.OutOfMemoryError:
                print(f"{name}: out of memory at batch {args.batch}")
                rows[name] = (float("nan"), float("nan"), float("nan"))
            except Exception as error:  # one configuration failing costs its row, not the rest of the device call
                print(f"{name}: FAILED: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}")
                rows[name] = (float("nan"), float("nan"), float("nan"))
            print(f"measured {name}: {row_cells(rows[name], flops, args)}", flush=True)  # kept if a later one hangs
    device = torch.cuda.get_device_name() if args.accelerator == "gpu" else "CPU"
    print(f"\n{args.model} UNet, {args.resolution}px, batch {args.batch}, {args.precision}, {device}")
    print("| configuration | img/s | MFU | ms/step | first step (compile) s | peak GiB |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, row in rows.items():
        print(f"| {name} | {row_cells(row, flops, args)} |")
    if "plain" in rows:
        for name in rows.keys() - {"plain"}:
            print(f"ratio {name} / plain (img/s): {rows['plain'][0] / rows[name][0]:.3f}")
    if "compiled" in rows:
        for name in sorted(n for n in rows if n.startswith("compiled_")):
            print(f"ratio {name} / compiled (img/s): {rows['compiled'][0] / rows[name][0]:.3f}")
    if "single" in rows:
        for name in sorted(n for n in rows if n.startswith("zero")):
            print(f"ratio {name} / single (img/s): {rows['single'][0] / rows[name][0]:.3f}")


if __name__ == "__main__":
    main()
