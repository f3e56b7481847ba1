"""Precompute on 1 process vs 2 processes (torchrun), same shards, same encoders, this machine.

1,024 real digits in 8 raw shards, preprocessed to 256 px, the demo's small VAE and text
encoder, batch 64. Each side is the whole command (`lf-precompute`, or `torchrun
--nproc_per_node=2 -m trainer.cli.precompute`), so process start-up (imports, model loading) is
included on both sides. On a 2-core machine the two processes share the cores torch already
uses, so expect little gain here; the split itself is what the test suite checks.

Run: ``python bench/bench_precompute_scaling.py``. The last line is the ratio.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from hydra.utils import instantiate

from data_pipelines.raw.sources.digits import DigitsSource
from data_pipelines.raw.writer import write_raw_shards
from trainer.cli.hydra_app import compose_config
from trainer.tiny_models.tiny_text_encoder import save_tiny_text_encoder

SAMPLES, RESOLUTION = 1024, 256


def run(command: list[str], out: Path) -> float:
    start = time.perf_counter()
    subprocess.run(
        [*command, f"out_dir={out}", f"hydra.run.dir={out}-hydra"],
        check=True,
        capture_output=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    return time.perf_counter() - start


def main() -> None:
    bin_dir = Path(sys.executable).parent
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        write_raw_shards(DigitsSource("all", limit=SAMPLES), folder / "raw", samples_per_shard=SAMPLES // 8)
        save_tiny_text_encoder(folder / "base")
        torch.manual_seed(0)
        instantiate(compose_config("train_autoencoder", ["data.shards=unused"]).autoencoder.vae).save_pretrained(
            folder / "base" / "vae"
        )
        overrides = [
            f"shards={folder / 'raw'}",
            f"pretrained={folder / 'base'}",
            f"resolution={RESOLUTION}",
            "batch_size=64",
        ]
        one = run([str(bin_dir / "lf-precompute"), *overrides], folder / "one")
        two = run(
            [
                str(bin_dir / "torchrun"),
                "--standalone",
                "--nproc_per_node=2",
                "-m",
                "trainer.cli.precompute",
                *overrides,
            ],
            folder / "two",
        )
    print(f"1 process:   {one:6.1f} s, {SAMPLES / one:6.1f} samples/s")
    print(f"2 processes: {two:6.1f} s, {SAMPLES / two:6.1f} samples/s")
    print(f"scaling (2 processes / 1 process, samples/s): {one / two:.2f}x")


if __name__ == "__main__":
    main()
