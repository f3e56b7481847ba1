"""Framework overhead: the ``lf-train`` training path (Lightning) vs a bare PyTorch loop.

Both sides train the same UNet (the tiny config's 0.7 M parameters at batch 64: 100-200 ms a step
on one CPU thread) on the same in-memory batches of latents and text embeddings, with the same work per
step: the diffusion loss, backward, gradient clipping at 1.0, AdamW, the LR schedule and an EMA
update of the weights. The Lightning side is the ``Trainer`` that ``lf-train`` builds from
``conf/train.yaml`` (default callbacks: EMA, checkpointing, LR monitor, throughput with FLOP
counting, the RNG-state callback; CSV logger every 25 steps; progress bar), fed by a DataLoader
over the in-memory batches. Steady-state time per step is measured after warm-up steps, in
alternating rounds; the median round counts. Torch runs one thread (on a shared 2-core machine two
threads per process ran 5x slower), so the process's CPU time per step measures the work of each
side even while other jobs load the machine; wall time is printed too, and equals CPU time on an
idle machine.

Run: ``python bench/overhead.py``. The last line is the ratio (goal: >= 0.95).
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
from hydra.utils import instantiate
from torch.optim.swa_utils import AveragedModel
from torch.utils.data import DataLoader, IterableDataset

from trainer.callbacks.ema import EMA
from trainer.callbacks.rng import RNGState
from trainer.cli.hydra_app import build_trainer, compose_config, optimizer_factories

BATCH, WARMUP, STEPS, ROUNDS = 64, 5, 40, 5


class InMemory(IterableDataset):
    """The same batches, epoch after epoch."""

    def __init__(self, batches: list[dict[str, torch.Tensor]]) -> None:
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)


def clocks() -> tuple[float, float]:
    """(process CPU seconds, wall seconds)."""
    return time.process_time(), time.perf_counter()


def per_step(start: tuple[float, float], end: tuple[float, float]) -> tuple[float, float]:
    return (end[0] - start[0]) / STEPS, (end[1] - start[1]) / STEPS


class StepTimer(L.Callback):
    """Clocks from the start of step ``WARMUP`` to the end of the last step."""

    def __init__(self) -> None:
        self.start: tuple[float, float] | None = None
        self.end = (0.0, 0.0)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == WARMUP and self.start is None:
            self.start = clocks()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.end = clocks()


def make_batches(count: int, text_tokens: int, text_dim: int) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    return [
        {
            "latents": torch.randn(BATCH, 4, 8, 8, generator=generator).half(),  # (B, 4, 8, 8)
            "text": torch.randn(BATCH, text_tokens, text_dim, generator=generator).half(),  # (B, T, D)
        }
        for _ in range(count)
    ]


def fresh_module(cfg, uncond: torch.Tensor):
    torch.manual_seed(0)
    return instantiate(cfg.model, **optimizer_factories(cfg), uncond_text=uncond)


def lightning_step_time(cfg, batches, uncond) -> tuple[float, float]:
    timer = StepTimer()
    trainer = build_trainer(cfg, [RNGState(), timer])
    trainer.fit(fresh_module(cfg, uncond), train_dataloaders=DataLoader(InMemory(batches), batch_size=None))
    return per_step(timer.start, timer.end)


def bare_step_time(cfg, batches, uncond) -> tuple[float, float]:
    module = fresh_module(cfg, uncond)
    configured = module.configure_optimizers()
    optimizer, scheduler = configured["optimizer"], configured["lr_scheduler"]["scheduler"]
    ema_callback = EMA(decay=cfg.callbacks.ema.decay)
    ema = AveragedModel(module, use_buffers=True, multi_avg_fn=ema_callback._update)
    module.train()
    start = clocks()
    for step in range(WARMUP + STEPS):
        if step == WARMUP:
            start = clocks()
        batch = batches[step % len(batches)]
        loss = module.compute_loss(batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        ema.update_parameters(module)
    return per_step(start, clocks())


def main() -> None:
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = compose_config(
            "train",
            [
                "data.train_dir=unused",
                f"output_dir={Path(tmp)}",
                f"trainer.max_steps={WARMUP + STEPS}",
                "trainer.accelerator=cpu",
                "trainer.enable_model_summary=false",
            ],
        )
        uncond = torch.zeros(8, cfg.model.unet.cross_attention_dim)
        batches = make_batches(20, 8, cfg.model.unet.cross_attention_dim)
        lightning_times, bare_times = [], []
        for _ in range(ROUNDS):
            bare_times.append(bare_step_time(cfg, batches, uncond))
            lightning_times.append(lightning_step_time(cfg, batches, uncond))
    for clock, index in (("wall", 1), ("CPU", 0)):
        bare = statistics.median(t[index] for t in bare_times)
        lightning = statistics.median(t[index] for t in lightning_times)
        print(f"{clock} ms/step by round: bare {[round(t[index] * 1e3, 1) for t in bare_times]}")
        print(f"{' ' * len(clock)}                    lf-train {[round(t[index] * 1e3, 1) for t in lightning_times]}")
        print(f"{clock:>4} bare PyTorch loop: {bare * 1e3:7.1f} ms/step  {1 / bare:6.2f} steps/s")
        print(f"{clock:>4} lf-train path:     {lightning * 1e3:7.1f} ms/step  {1 / lightning:6.2f} steps/s")
    print(f"lf-train steps/s as a fraction of the bare loop's (CPU time): {bare / lightning:.3f}")


if __name__ == "__main__":
    main()
