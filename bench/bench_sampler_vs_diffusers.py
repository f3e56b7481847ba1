"""Time per image: the included sampler vs diffusers' ``StableDiffusionPipeline``, same weights.

One export folder (the tiny test model: the demo's UNet, a small VAE, a 2-layer CLIP text encoder
with 77 tokens, random seeded weights, 32x32 images); the same scheduler, steps, guidance, prompts
and per-image seeds on both sides; the same process and threads. Rounds alternate ours and
theirs, so load on the shared machine hits both alike; the ratio is the median over rounds of
(ours / diffusers) within a round, with each side's fastest and median round printed beside it.
The images are checked to agree (max pixel difference) before timing.

Run: ``python bench/bench_sampler_vs_diffusers.py [--scheduler dpmpp_2m --steps 25 --batch 4 --rounds 15]``.
On a GPU, an SD 1.5-sized model (random weights from SD 1.5's configs, 860 M-parameter UNet)::

    python bench/bench_sampler_vs_diffusers.py --model sd15 --device cuda --dtype float16 --size 512 \
        --steps 30 --batch 1 --rounds 5      # and --batch 8

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
from trainer.sampling.sampler import Sampler, SampleSettings
from trainer.sampling.schedulers import make_scheduler
from trainer.tiny_models.tiny_pipeline import make_tiny_export
from trainer.tiny_models.tiny_text_encoder import save_tiny_text_encoder

PROMPTS = [
    "a handwritten digit zero",
    "a handwritten digit one",
    "a handwritten digit two",
    "a handwritten digit three",
]


def build(folder: Path) -> Path:
    """The tiny export (the tests' model)."""
    save_tiny_text_encoder(folder / "base")
    torch.manual_seed(0)
    vae = instantiate(compose_config("train_autoencoder", ["data.shards=unused"]).autoencoder.vae)
    vae.save_pretrained(folder / "base" / "vae")
    return make_tiny_export(folder / "base", folder / "export")


def build_sd15(folder: Path, dtype: torch.dtype) -> Path:
    """An export with SD 1.5's architecture and noise schedule, random weights (no download)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from data_pipelines.latents.tokenizer import save_clip_tokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=64,
        block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        layers_per_block=2,
        cross_attention_dim=768,
        attention_head_dim=8,
    )
    vae = AutoencoderKL(
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=2,
        latent_channels=4,
        sample_size=512,
    )
    text = CLIPTextModel(
        CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12)
    )
    save_clip_tokenizer(folder / "tokenizer", max_length=77)
    pipe = StableDiffusionPipeline(
        vae=vae.to(dtype),
        text_encoder=text.to(dtype),
        tokenizer=CLIPTokenizer.from_pretrained(folder / "tokenizer"),
        unet=unet.to(dtype),
        scheduler=DDPMScheduler(
            beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, steps_offset=1
        ),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(folder / "export", safe_serialization=True)
    return folder / "export"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scheduler", default="dpmpp_2m")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--model", choices=("tiny", "sd15"), default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--size", type=int, default=None, help="image side (default: the model's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    prompts = (PROMPTS * args.batch)[: args.batch]
    seeds = list(range(args.batch))

    dtype = getattr(torch, args.dtype)
    with tempfile.TemporaryDirectory() as tmp:
        export = build(Path(tmp)) if args.model == "tiny" else build_sd15(Path(tmp), dtype)
        ours = Sampler.from_export(export, device=args.device, dtype=args.dtype)
        size = args.size or ours.unet.config.sample_size * ours.vae_scale
        settings = SampleSettings(
            steps=args.steps, guidance_scale=args.guidance, scheduler=args.scheduler, height=size, width=size
        )
        pipe = StableDiffusionPipeline.from_pretrained(
            export, local_files_only=True, safety_checker=None, torch_dtype=dtype
        ).to(args.device)
        pipe.scheduler = make_scheduler(args.scheduler, dict(pipe.scheduler.config))
        pipe.set_progress_bar_config(disable=True)

        def synchronize():
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()

        def run_ours():
            images = ours.txt2img(prompts, seeds, settings)[0]
            synchronize()
            return images

        def run_theirs():
            generators = [torch.Generator().manual_seed(s) for s in seeds]
            images = pipe(
                prompts,
                num_inference_steps=args.steps,
                guidance_scale=args.guidance,
                generator=generators,
                height=size,
                width=size,
            ).images
            synchronize()
            return images

        a, b = run_ours(), run_theirs()  # warm-up, and the outputs agree
        difference = max(int(np.abs(np.asarray(x, int) - np.asarray(y, int)).max()) for x, y in zip(a, b, strict=True))
        times: dict[str, list[float]] = {"ours": [], "diffusers": []}
        for _ in range(args.rounds):
            for name, run in (("ours", run_ours), ("diffusers", run_theirs)):
                start = time.perf_counter()
                run()
                times[name].append((time.perf_counter() - start) / args.batch)
    where = (
        torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU, {torch.get_num_threads()} threads"
    )
    print(f"torch {torch.__version__}, {where}, {args.model} model, {args.dtype}")
    print(f"{args.scheduler}, {args.steps} steps, batch {args.batch}, CFG {args.guidance}, {size}x{size} px")
    print(f"{args.rounds} rounds")
    print(f"max pixel difference ours vs diffusers: {difference}/255")
    for name, values in times.items():
        fastest, median = 1000 * min(values), 1000 * statistics.median(values)
        print(f"{name:>9}: fastest {fastest:.1f} ms/image, median {median:.1f} ms/image")
    ratios = [ours / theirs for ours, theirs in zip(times["ours"], times["diffusers"], strict=True)]
    print(f"ratio of fastest rounds: {min(times['ours']) / min(times['diffusers']):.3f}")
    print(f"ratio ours/diffusers (median of per-round ratios): {statistics.median(ratios):.3f}")


if __name__ == "__main__":
    main()
