"""``data=images_online`` (encode raw images in every step) against ``data=latents`` (precomputed latent
shards) on the demo's digits: lf-train's time per step on each path, and after how many epochs the
precompute has paid for itself.

Both runs are ``lf-train experiment=demo_digits`` (the demo's tiny UNet, batch 128, EMA, caption dropout)
for the same number of steps on the same raw digits (the demo's training split at 32 px), with the same
tiny VAE and text encoder (random, seeded: their cost does not depend on their weights). The time per step
is the throughput monitor's over its last window (data loading and, online, the encoders included;
start-up not). The precompute is ``lf-precompute`` of those digits, timed whole.

Payback: precompute costs ``P`` seconds once; every epoch of ``N / B`` steps on the cache saves
``(t_online - t_cached) * N / B`` seconds, so the cache has paid for itself after ``P`` over that epochs.

Run: ``python bench/online_vs_cached.py [STEPS]``. The last line is the ratio.
"""

from __future__ import annotations

import csv
import sys
import tempfile
import time
from pathlib import Path

import torch
from hydra.utils import instantiate

from data_pipelines.raw.sources.digits import DigitsSource
from data_pipelines.raw.writer import write_raw_shards
from trainer.cli.hydra_app import compose_config
from trainer.cli.precompute import run_precompute
from trainer.cli.train import run_train
from trainer.tiny_models.tiny_text_encoder import save_tiny_text_encoder

STEPS = 120
RATE = "train/device/batches_per_sec"
WINDOW = 60  # steps the time per step is averaged over (the last ones; at most half the run)


def build(folder: Path) -> tuple[Path, Path, int]:
    """Raw shards of the demo's training digits and a base folder (the demo's text encoder, a tiny VAE)."""
    raw = folder / "raw"
    write_raw_shards(DigitsSource("train"), raw, samples_per_shard=256)
    demo = compose_config("demo", [])
    save_tiny_text_encoder(folder / "base", **demo.text_encoder)
    torch.manual_seed(0)
    vae = instantiate(compose_config("train_autoencoder", ["data.shards=unused"]).autoencoder.vae)
    vae.save_pretrained(folder / "base" / "vae")
    return raw, folder / "base", len(DigitsSource("train"))


def seconds_per_step(data: list[str], out: Path, steps: int) -> float:
    """lf-train's time per step of the demo's training with ``data`` overrides, over its last steps."""
    window = min(WINDOW, steps // 2)
    overrides = [
        "experiment=demo_digits",
        *data,
        f"output_dir={out}",
        f"trainer.max_steps={steps}",
        f"trainer.log_every_n_steps={window}",
        f"callbacks.throughput.window_size={window}",
        "callbacks.digits_accuracy=null",
        f"callbacks.model_checkpoint.every_n_train_steps={steps}",
        "trainer.accelerator=cpu",
    ]
    run_train(compose_config("train", overrides))
    (log,) = out.rglob("metrics.csv")  # the CSV logger's: the throughput monitor logs to the loggers only
    with log.open() as handle:
        rates = [float(row[RATE]) for row in csv.DictReader(handle) if row.get(RATE)]
    return 1.0 / rates[-1]


def main() -> None:
    steps = int(sys.argv[1]) if len(sys.argv) > 1 else STEPS
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        raw, base, count = build(folder)
        start = time.perf_counter()
        precompute_overrides = [f"shards={raw}", f"out_dir={folder / 'latents'}", f"pretrained={base}", "resolution=32"]
        run_precompute(compose_config("precompute", [*precompute_overrides, "batch_size=256"]))
        precompute = time.perf_counter() - start
        cached = seconds_per_step([f"data.train_dir={folder / 'latents'}"], folder / "cached", steps)
        online = seconds_per_step(
            ["data=images_online", f"data.shards={raw}", f"data.pretrained={base}", "data.resolution=32",
             "data.crop=center", "data.batch_size=128", "data.num_workers=0", "data.shuffle_buffer=500"],
            folder / "online", steps,
        )  # fmt: skip
    batch = 128
    epoch_steps = count / batch
    saving = (online - cached) * epoch_steps
    payback = precompute / saving if saving > 0 else float("nan")
    print(f"digits: {count} images at 32 px, batch {batch} ({epoch_steps:.1f} steps per epoch), {steps} steps per run")
    print(f"precompute (lf-precompute, once):        {precompute:7.1f} s")
    print(f"cached  (data=latents) per step:         {cached * 1e3:7.1f} ms")
    print(f"online  (data=images_online) per step:   {online * 1e3:7.1f} ms")
    print(f"the cache pays back the precompute after {payback:.1f} epochs ({saving:.2f} s saved per epoch)")
    print(f"online / cached time per step: {online / cached:.2f}x")


if __name__ == "__main__":
    main()
