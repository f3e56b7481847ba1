"""Precompute throughput on a GPU: ``lf-precompute`` (raw shards -> latent shards) vs a plain diffusers
encode loop, in images/s.

Both sides encode the same real photos (scikit-image's sample images, repeated to ``--images``) with
the same random-init parts: SD's VAE architecture (``conf/autoencoder/sd.yaml``) and SD 1.5's CLIP
text encoder architecture, in ``--dtype``. The steady rate of ``lf-precompute`` is the cost of the
extra images between a run on a quarter of them and a run on all (start-up taken out); the whole
command's rate is printed too. The plain loop is what a user writes from diffusers'
examples: images already decoded and resized in memory (no loader at all, its best case), batches
of ``--batch``, ``vae.encode(x).latent_dist.mode()`` and the text encoder, outputs moved to the CPU.
The contender is the whole ``lf-precompute`` command path: JPEG decoding and resizing in
``--workers`` loader processes, both encoders, writing latent shards and the manifest. A ratio
of 1.0 or more means the loader is not the bottleneck. A warm-up run of each side comes first.

Run: ``python bench/gpu_precompute.py --resolution 512`` (``bench/gpu_checks.sh`` runs 256 and 512).
On a CPU, a smoke run: ``python bench/gpu_precompute.py --vae tiny --text-encoder tiny --device cpu
--dtype float32 --resolution 32 --images 64 --batch 16 --workers 0``.
"""

from __future__ import annotations

import argparse
import io
import tempfile
import time
from pathlib import Path

import torch
from hydra.utils import instantiate
from PIL import Image

from data_pipelines.latents.encoders import encode_text
from data_pipelines.raw.sources.base import SourceItem
from data_pipelines.raw.writer import write_raw_shards
from data_pipelines.transforms.images import ResizeCrop
from trainer.cli.hydra_app import compose_config
from trainer.cli.precompute import run_precompute
from trainer.tiny_models.tiny_text_encoder import save_tiny_text_encoder

SD15_TEXT = {
    "hidden_size": 768,
    "num_layers": 12,
    "num_heads": 12,
    "intermediate_size": 3072,
    "token_embedding_std": 0.02,
}
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry")


def photos(count: int) -> list[tuple[bytes, str]]:
    """``count`` JPEG-encoded real photos with their loaders' first docstring line as caption."""
    from skimage import data

    items = []
    for name in PHOTOS:
        loader = getattr(data, name)
        buffer = io.BytesIO()
        Image.fromarray(loader()).convert("RGB").save(buffer, format="JPEG", quality=95)
        items.append((buffer.getvalue(), (loader.__doc__ or name).strip().splitlines()[0]))
    return [items[i % len(items)] for i in range(count)]


def make_pretrained(folder: Path, vae: str, text_encoder: str) -> Path:
    """A diffusers-layout folder with a random-init VAE (``conf/autoencoder/<vae>.yaml``) and text encoder."""
    torch.manual_seed(0)
    instantiate(
        compose_config("train_autoencoder", [f"autoencoder={vae}", "data.shards=x"]).autoencoder.vae
    ).save_pretrained(folder / "vae", safe_serialization=True)
    save_tiny_text_encoder(folder, **(SD15_TEXT if text_encoder == "sd15" else {}))
    return folder


def plain_loop(items, pretrained: Path, args) -> float:
    """Seconds for the diffusers-example encode loop over in-memory, already-resized images."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel, CLIPTokenizer

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    vae = AutoencoderKL.from_pretrained(pretrained / "vae", torch_dtype=dtype).to(device).eval()
    text_encoder = CLIPTextModel.from_pretrained(pretrained / "text_encoder", dtype=dtype).to(device).eval()
    tokenizer = CLIPTokenizer.from_pretrained(pretrained / "tokenizer")
    resize = ResizeCrop(args.resolution)
    pixels = torch.stack([resize(Image.open(io.BytesIO(data)).convert("RGB"))[0] for data, _ in items])  # (N, 3, R, R)
    captions = [caption for _, caption in items]

    def run() -> None:
        with torch.no_grad():
            for start in range(0, len(items), args.batch):
                x = pixels[start : start + args.batch].to(device, dtype, non_blocking=True)
                latents = vae.encode(x).latent_dist.mode() * vae.config.scaling_factor
                text = encode_text(tokenizer, text_encoder, captions[start : start + args.batch])
                latents.cpu(), text.cpu()

    run()  # warm-up
    _sync()
    start = time.perf_counter()
    run()
    _sync()
    return time.perf_counter() - start


def precompute(shards: Path, pretrained: Path, out: Path, args) -> float:
    """Seconds for the whole ``lf-precompute`` path."""
    overrides = [f"shards={shards}", f"out_dir={out}", f"pretrained={pretrained}", f"resolution={args.resolution}",
                 f"batch_size={args.batch}", f"device={args.device}", f"dtype={args.dtype}",
                 f"num_workers={args.workers}"]  # fmt: skip
    _sync()
    start = time.perf_counter()
    run_precompute(compose_config("precompute", overrides))
    _sync()
    return time.perf_counter() - start


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--images", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--vae", default="sd", help="conf/autoencoder/<name>.yaml")
    parser.add_argument("--text-encoder", default="sd15", choices=["sd15", "tiny"])
    args = parser.parse_args()
    items = photos(args.images)
    few = max(args.batch, args.images // 4)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        pretrained = make_pretrained(root / "pretrained", args.vae, args.text_encoder)
        for name, count in (("raw", args.images), ("raw_few", few)):
            source = (SourceItem(f"photo[{i}]", data, caption) for i, (data, caption) in enumerate(items[:count]))
            write_raw_shards(source, root / name, samples_per_shard=max(1, count // 16))
        plain = plain_loop(items, pretrained, args)
        precompute(root / "raw_few", pretrained, root / "warmup", args)
        whole = precompute(root / "raw", pretrained, root / "latents", args)
        start_up = precompute(root / "raw_few", pretrained, root / "latents_few", args)
    # the steady rate: what the extra images cost, without the fixed start-up (loading, Trainer set-up)
    marginal = (whole - start_up) / (args.images - few) * args.images
    device = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    what = f"{args.vae} VAE, {args.text_encoder} text encoder, {args.resolution}px batch {args.batch} {args.dtype}"
    print(f"{'plain diffusers encode loop':36s} {what} on {device}: {args.images / plain:8.1f} img/s")
    print(f"{'lf-precompute, whole command':36s} {what} on {device}: {args.images / whole:8.1f} img/s "
          f"({whole:.1f} s for {args.images} images, {start_up:.1f} s for {few})")  # fmt: skip
    steady = f"lf-precompute, steady ({args.workers} workers)"
    if marginal <= 0:  # the extra images cost less than the run-to-run noise of the start-up: no steady rate
        print(f"{steady:36s} {what} on {device}:      nan img/s (start-up noise exceeds the extra images' cost: "
              "raise --images)")  # fmt: skip
        print("ratio lf-precompute (steady) / plain (img/s): nan")
        return
    print(f"{steady:36s} {what} on {device}: {args.images / marginal:8.1f} img/s")
    print(f"ratio lf-precompute (steady) / plain (img/s): {plain / marginal:.3f}")


if __name__ == "__main__":
    main()
