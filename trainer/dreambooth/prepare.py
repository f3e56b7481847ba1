"""Before DreamBooth training: check the instance photos, generate missing class images, and encode
both folders once into latent shards (VAE latents and text embeddings), reused by later runs.

``lf-train experiment=dreambooth`` runs :func:`prepare_dreambooth` (config ``prepare.dreambooth``)
before it builds the data module. Under torchrun every rank generates its share of the class images,
then rank 0 encodes; the other ranks wait. Processes that Lightning itself starts (``strategy=ddp``
without torchrun) find everything prepared by rank 0, which ran this before starting them.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch.distributed as dist
from PIL import Image, UnidentifiedImageError

from data_pipelines.latents.encoders import FrozenEncoders
from data_pipelines.latents.precompute import precompute_latents
from data_pipelines.latents.shard_encoder import LatentShardEncoder
from data_pipelines.raw.sources.base import SourceItem
from data_pipelines.raw.writer import write_raw_shards
from data_pipelines.shards.listing import resolve_shards
from data_pipelines.transforms.images import ResizeCrop
from lf_common.errors import DataError
from trainer.dreambooth.class_images import class_image_path, generate_class_images, missing_class_images
from trainer.sampling.sampler import SampleSettings

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
CAPTION_SUFFIXES = (".txt",)


@dataclass
class DreamBoothLatents:
    """Where the encoded instance (and class) samples are."""

    instance: Path
    classes: Path | None


def instance_images(folder: str | Path) -> list[Path]:
    """The photos of the subject, sorted.

    Raises:
        DataError: the folder is missing or empty, or holds files that are not images (named).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"data.instance_dir: {folder} does not exist or is not a folder")
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    images, bad = [], []
    for path in files:
        if path.suffix.lower() in CAPTION_SUFFIXES:
            continue
        try:
            with Image.open(path) as image:
                image.verify()
            images.append(path)
        except (UnidentifiedImageError, OSError):
            bad.append(path.name)
    if bad:
        raise DataError(f"data.instance_dir: {folder} holds files that are not images: {bad}; remove them")
    if not images:
        raise DataError(f"data.instance_dir: {folder} holds no image (expected a few photos of the subject)")
    return images


def _items(paths: list[Path], caption: str | None) -> Iterator[SourceItem]:
    """Image files as source items; ``caption`` for all, or each image's ``.txt`` when ``None``."""
    for path in paths:
        text = caption if caption is not None else path.with_suffix(".txt").read_text(encoding="utf-8").strip()
        yield SourceItem(str(path), path.read_bytes(), text)


def _launch_rank_world() -> tuple[int, int] | None:
    """``(rank, world)`` under torchrun; ``(0, 1)`` alone; ``None`` in a process Lightning started."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env and "MASTER_ADDR" in env:
        return int(env["RANK"]), int(env["WORLD_SIZE"])
    if int(env.get("LOCAL_RANK", "0")) > 0 or int(env.get("SLURM_PROCID", "0")) > 0:
        return None
    return 0, 1


@contextmanager
def _process_group(world: int) -> Iterator[None]:
    """A gloo group for the preparation's barriers, torn down after it so the training strategy
    starts its own (NCCL on GPUs)."""
    created = world > 1 and not dist.is_initialized()
    if created:
        dist.init_process_group("gloo")
    try:
        yield
    finally:
        if created:
            dist.destroy_process_group()


def _barrier(world: int) -> None:
    if world > 1:
        dist.barrier()


def _raw_shards(images: list[Path], caption: str | None, work: Path) -> list[str]:
    """Raw shards of ``images`` (rewritten byte-identically each run, so their cache key holds)."""
    write_raw_shards(_items(images, caption), work / "shards", samples_per_shard=10_000, overwrite=True)
    return resolve_shards(str(work / "shards"))


def prepare_dreambooth(
    instance_dir: str,
    instance_prompt: str,
    cache_dir: str,
    pretrained: str,
    resolution: int,
    class_prompt: str | None = None,
    class_dir: str | None = None,
    num_class_images: int = 100,
    sample_steps: int = 25,
    guidance_scale: float = 7.5,
    sample_batch_size: int = 4,
    seed: int = 0,
    device: str = "auto",
) -> DreamBoothLatents | None:
    """Check, generate and encode what DreamBooth training reads.

    Args:
        instance_dir: a handful of photos of the subject.
        instance_prompt: their caption, with a rare identifier: ``"a photo of sks cat"``.
        cache_dir: where raw and latent shards of both sets go (reused by later runs).
        pretrained: the base model, a diffusers pipeline folder (VAE, text encoder, tokenizer, UNet).
        resolution: the training resolution (resize + center crop).
        class_prompt: the class's prompt (``"a photo of a cat"``); ``None``: no prior preservation.
        class_dir: the class images' folder (default ``<cache_dir>/class_images``).
        num_class_images: how many class images prior preservation uses.
        sample_steps, guidance_scale, sample_batch_size, seed: class image generation.

    Returns:
        The latent folders; ``None`` in a process that Lightning started (rank 0 prepared them).
    """
    launch = _launch_rank_world()
    if launch is None:
        log.info("DreamBooth data: prepared by rank 0")
        return None
    rank, world = launch
    images = instance_images(instance_dir)
    cache = Path(cache_dir)
    classes_folder = Path(class_dir) if class_dir else cache / "class_images"
    if class_prompt is not None and class_prompt.strip() == instance_prompt.strip():
        log.warning(
            "data.class_prompt equals data.instance_prompt (%r): prior preservation then pulls the subject "
            "back to the class; give the instance prompt a rare identifier, e.g. 'a photo of sks cat'",
            instance_prompt,
        )
    with _process_group(world):
        if class_prompt is not None:
            settings = SampleSettings(steps=sample_steps, guidance_scale=guidance_scale, height=resolution,
                                      width=resolution)  # fmt: skip
            generate_class_images(classes_folder, class_prompt, num_class_images, pretrained, rank, world,
                                  sample_batch_size, settings, seed, device)  # fmt: skip
        _barrier(world)
        sets = {"instance": (images, instance_prompt)}
        if class_prompt is not None:
            if missing_class_images(classes_folder, num_class_images):
                raise DataError(f"{classes_folder}: class images are still missing after generation")
            sets["class"] = ([class_image_path(classes_folder, i) for i in range(num_class_images)], None)
        if rank == 0:
            for name, (paths, caption) in sets.items():
                _raw_shards(paths, caption, cache / name)
        _barrier(world)
        root = Path(pretrained)
        encoder = LatentShardEncoder(
            FrozenEncoders.from_pretrained(root / "vae", root / "text_encoder", root / "tokenizer", device=device),
            ResizeCrop(resolution, crop="center"),
            batch_size=16,
        )
        for name in sets:  # every rank encodes its share of the shards; rank 0 writes the manifest
            shards = resolve_shards(str(cache / name / "shards"))
            precompute_latents(shards, cache / name / "latents", encoder, recompute_stale=True)
        _barrier(world)
    return DreamBoothLatents(cache / "instance" / "latents", cache / "class" / "latents" if class_prompt else None)
