"""Time per image: the included sampler vs diffusers' ``StableDiffusionPipeline``, same weights.

One export folder (the tiny test model: the demo's UNet, a small VAE, a 2-layer CLIP text encoder
with 77 tokens, random seeded weights, 32x32 images); the same scheduler, steps, guidance, prompts
and per-image seeds on both sides; the same process and threads. Rounds alternate ours and
theirs, so load on the shared machine hits both alike; the ratio is the median over rounds of
(ours / diffusers) within a round, with each side's fastest and median round printed beside it.
The images are checked to agree (max pixel difference) before timing.

Run: ``python bench/bench_sampler_vs_diffusers.py [--scheduler dpmpp_2m --steps 25 --batch 4 --rounds 15]``.
The last line is the ratio (ours / diffusers; below 1 means ours is faster).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import StableDiffusionPipeline
from hydra.utils import instantiate

from trainer.cli.hydra_app import compose_config
from trainer.models.tiny_pipeline import make_tiny_export
from trainer.models.tiny_text_encoder import save_tiny_text_encoder
from trainer.sampling.sampler import Sampler, SampleSettings
from trainer.sampling.schedulers import make_scheduler

PROMPTS = [
    "a handwritten digit zero",
    "a handwritten digit one",
    "a handwritten digit two",
    "a handwritten digit three",
]


def build(folder: Path) -> Path:
    save_tiny_text_encoder(folder / "base")
    torch.manual_seed(0)
    vae = instantiate(compose_config("train_autoencoder", ["data.shards=unused"]).autoencoder.vae)
    vae.save_pretrained(folder / "base" / "vae")
    return make_tiny_export(folder / "base", folder / "export")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scheduler", default="dpmpp_2m")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    prompts = (PROMPTS * args.batch)[: args.batch]
    seeds = list(range(args.batch))

    with tempfile.TemporaryDirectory() as tmp:
        export = build(Path(tmp))
        ours = Sampler.from_export(export, device="cpu")
        settings = SampleSettings(steps=args.steps, guidance_scale=args.guidance, scheduler=args.scheduler)
        pipe = StableDiffusionPipeline.from_pretrained(export, local_files_only=True, safety_checker=None)
        pipe.scheduler = make_scheduler(args.scheduler, dict(pipe.scheduler.config))
        pipe.set_progress_bar_config(disable=True)

        def run_ours():
            return ours.txt2img(prompts, seeds, settings)[0]

        def run_theirs():
            generators = [torch.Generator().manual_seed(s) for s in seeds]
            return pipe(
                prompts, num_inference_steps=args.steps, guidance_scale=args.guidance, generator=generators
            ).images

        a, b = run_ours(), run_theirs()  # warm-up, and the outputs agree
        difference = max(int(np.abs(np.asarray(x, int) - np.asarray(y, int)).max()) for x, y in zip(a, b, strict=True))
        times: dict[str, list[float]] = {"ours": [], "diffusers": []}
        for _ in range(args.rounds):
            for name, run in (("ours", run_ours), ("diffusers", run_theirs)):
                start = time.perf_counter()
                run()
                times[name].append((time.perf_counter() - start) / args.batch)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU")
    print(f"{args.scheduler}, {args.steps} steps, batch {args.batch}, CFG {args.guidance}, 32x32, {args.rounds} rounds")
    print(f"max pixel difference ours vs diffusers: {difference}/255")
    for name, values in times.items():
        fastest, median = 1000 * min(values), 1000 * statistics.median(values)
        print(f"{name:>9}: fastest {fastest:.1f} ms/image, median {median:.1f} ms/image")
    ratios = [ours / theirs for ours, theirs in zip(times["ours"], times["diffusers"], strict=True)]
    print(f"ratio of fastest rounds: {min(times['ours']) / min(times['diffusers']):.3f}")
    print(f"ratio ours/diffusers (median of per-round ratios): {statistics.median(ratios):.3f}")


if __name__ == "__main__":
    main()
