"""Training throughput on a GPU: the ``lf-train`` path vs a plain PyTorch + diffusers loop.

The plain loop is what a user writes from diffusers' ``train_text_to_image.py`` on precomputed
latents: ``UNet2DConditionModel`` from the same config, AdamW (fused on CUDA), bf16 autocast, DDPM
noise, MSE on epsilon, backward, step. The contender is the ``Trainer`` that ``lf-train`` builds from
``conf/train.yaml`` with ``model=<model>``, the given strategy (default DeepSpeed ZeRO-2 on one
device) and precision, without EMA and checkpoints (the plain loop has neither). Both read the same
in-memory batches (latents ``(B, 4, R/8, R/8)`` and text ``(B, 77, 768)``, fp16, moved to the device
each step). Throughput is images/s over ``--steps`` steps after ``--warmup``; MFU uses the UNet's
FLOPs counted once (``torch.utils.flop_counter``) and ``--peak-tflops``.

Run: ``python bench/gpu_train.py --resolution 512 --batch 16`` (``bench/gpu_train.sh`` sweeps both
resolutions and batch sizes). The last line is the ratio lf-train / plain. On a CPU, a smoke run:
``python bench/gpu_train.py --model tiny --accelerator cpu --strategy single --precision 32-true
--resolution 32 --batch 4 --steps 2 --warmup 1``.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import lightning as L
import torch
from hydra.utils import instantiate
from torch.utils.data import DataLoader, IterableDataset

from trainer.callbacks.throughput import unet_train_flops
from trainer.cli.hydra_app import build_trainer, compose_config, optimizer_factories


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

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.warmup and self.start is None:
            _sync()
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        _sync()
        self.end = time.perf_counter()


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def make_batches(batch: int, resolution: int, text_dim: int, count: int = 4) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    side = resolution // 8
    return [
        {
            "latents": torch.randn(batch, 4, side, side, generator=generator).half(),  # (B, 4, R/8, R/8)
            "text": torch.randn(batch, 77, text_dim, generator=generator).half(),  # (B, 77, D)
        }
        for _ in range(count)
    ]


def plain_loop(cfg, batches, args) -> float:
    """Seconds per step of the diffusers-example loop."""
    device = torch.device("cuda" if args.accelerator == "gpu" else "cpu")
    torch.manual_seed(0)
    unet = instantiate(cfg.model.unet).to(device).train()
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
        noise = torch.randn_like(latents)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],), device=device)
        a = alphas[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
        with autocast:
            prediction = unet(noisy, t, encoder_hidden_states=text).sample
        loss = torch.nn.functional.mse_loss(prediction.float(), noise)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    _sync()
    return (time.perf_counter() - start) / args.steps


def lightning_path(cfg, batches, args) -> float:
    """Seconds per step of the Trainer lf-train builds."""
    torch.manual_seed(0)
    uncond = torch.zeros(77, cfg.model.unet.cross_attention_dim)
    module = instantiate(cfg.model, **optimizer_factories(cfg), uncond_text=uncond)
    timer = StepTimer(args.warmup)
    trainer = build_trainer(cfg, [timer])
    trainer.fit(module, train_dataloaders=DataLoader(InMemory(batches), batch_size=None))
    return (timer.end - timer.start) / args.steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="sd15")
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--strategy", default="deepspeed_stage_2")
    parser.add_argument("--precision", default="bf16-mixed")
    parser.add_argument("--accelerator", default="gpu")
    parser.add_argument("--peak-tflops", type=float, default=800.0, help="the device's dense bf16 peak")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = compose_config("train", [
            f"model={args.model}", "data.train_dir=unused", f"output_dir={tmp}", f"strategy={args.strategy}",
            f"trainer.precision={args.precision}", f"trainer.accelerator={args.accelerator}", "trainer.devices=1",
            f"trainer.max_steps={args.warmup + args.steps}", "trainer.enable_model_summary=false",
            "trainer.enable_progress_bar=false", "trainer.gradient_clip_val=null", "callbacks.ema=null",
            "callbacks.model_checkpoint=null", f"data.batch_size={args.batch}", "model.caption_dropout=0",
            "lr_scheduler=constant", "++trainer.enable_checkpointing=false",
        ])  # fmt: skip
        batches = make_batches(args.batch, args.resolution, cfg.model.unet.cross_attention_dim)
        side = args.resolution // 8
        flops = unet_train_flops(dict(cfg.model.unet), torch.Size((args.batch, 4, side, side)),
                                 torch.Size((args.batch, 77, cfg.model.unet.cross_attention_dim)))  # fmt: skip
        plain = plain_loop(cfg, batches, args)
        ours = lightning_path(cfg, batches, args)
    device = torch.cuda.get_device_name() if args.accelerator == "gpu" else "CPU"
    for name, seconds in (("plain PyTorch + diffusers", plain), (f"lf-train ({args.strategy})", ours)):
        mfu = flops / seconds / (args.peak_tflops * 1e12)
        print(f"{name:32s} {args.model} {args.resolution}px batch {args.batch} {args.precision} on {device}: "
              f"{args.batch / seconds:8.1f} img/s, {seconds * 1e3:7.1f} ms/step, MFU {mfu:.1%}")  # fmt: skip
    print(f"ratio lf-train / plain (img/s): {plain / ours:.3f}")


if __name__ == "__main__":
    main()
