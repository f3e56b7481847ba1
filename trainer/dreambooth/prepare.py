"""Before DreamBooth training: check the instance photos, generate the missing class images, and
encode both folders once into latent shards (VAE latents and text embeddings), reused by later runs.
An SDXL base folder (``text_encoder_2/``) gives SDXL's shards, as ``lf-precompute`` writes them: both
encoders' states, the pooled embedding, and each image's original size and crop (``time_ids``).

:class:`~trainer.dreambooth.datamodule.DreamBoothDataModule` runs :func:`prepare_dreambooth` in its
``setup`` hook, on every rank of the training job, with the job's Lightning strategy: whatever
started the processes (Lightning's launcher for ``trainer.devices=N``, torchrun, SLURM), the ranks,
the device and the collectives come from the strategy. Each rank generates its share of the class
images on its own device, then rank 0 encodes both sets while the others wait. The ranks wait for
each other through the store (:func:`~trainer.faults.ranks.all_ranks`, under the data module's
:func:`~trainer.faults.watchdog.guarded_ranks`), not in a process-group collective, so long
generation or encoding on some ranks never trips the process-group timeout on the others; a rank
that dies is named within ``distributed.timeout_s``. The folders must be on a file system that
every rank sees.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

from lightning.pytorch.strategies import Strategy
from PIL import Image, UnidentifiedImageError

from data_pipelines.latents.encoders import FrozenEncoders
from data_pipelines.latents.precompute import precompute_latents_in_process
from data_pipelines.latents.shard_encoder import LatentShardEncoder
from data_pipelines.latents.text_encoding import TextEncoding
from data_pipelines.raw.sources.base import SourceItem
from data_pipelines.raw.writer import write_raw_shards
from data_pipelines.shards.listing import resolve_shards
from data_pipelines.transforms.images import ResizeCrop
from lf_common import object_store
from lf_common.errors import DataError
from lf_common.object_cache import local_copy, model_folder
from trainer.dreambooth.class_images import class_image_path, generate_class_images, missing_class_images
from trainer.faults.ranks import all_ranks
from trainer.sampling.sampler import SampleSettings

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
CAPTION_SUFFIXES = (".txt",)


@dataclass(frozen=True)
class DreamBoothLatents:
    """Where the encoded instance (and class) samples are."""

    instance: Path
    classes: Path | None


@dataclass(frozen=True)
class ClassImages:
    """Prior preservation's class images, and how the base model generates the missing ones.

    Attributes:
        prompt: the class prompt, e.g. ``"a photo of a cat"``.
        folder: where they are (``class-<i>.png`` with ``class-<i>.txt``); a URL (``s3://...``) is read, not
            written: it must hold all ``count`` images (downloaded once to the download cache).
        count: how many prior preservation uses.
        settings: sampler settings (steps, guidance, size).
        batch_size: images per sampler call.
        seed: image ``i`` uses seed ``seed + i``.
    """

    prompt: str
    folder: Path | str
    count: int
    settings: SampleSettings
    batch_size: int = 4
    seed: int = 0


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


def _raw_shards(images: list[Path], caption: str | None, work: Path) -> list[str]:
    """Raw shards of ``images`` (rewritten byte-identically each run, so their cache key holds)."""
    write_raw_shards(_items(images, caption), work / "shards", samples_per_shard=10_000, overwrite=True)
    return resolve_shards(str(work / "shards"))


def prepare_dreambooth(
    strategy: Strategy,
    instance_dir: str | Path,
    instance_prompt: str,
    cache_dir: str | Path,
    pretrained: str | Path,
    resolution: int,
    classes: ClassImages | None = None,
    text_encoding: TextEncoding | None = None,
) -> DreamBoothLatents:
    """Check, generate and encode what DreamBooth training reads; call it on every rank.

    Args:
        strategy: the training job's strategy (ranks, device, collectives); a ``SingleDeviceStrategy``
            for one process.
        instance_dir: a handful of photos of the subject.
        instance_prompt: their caption, with a rare identifier: ``"a photo of sks cat"``.
        cache_dir: where raw and latent shards of both sets go (reused by later runs).
        pretrained: the base model, a diffusers pipeline folder (VAE, text encoder, tokenizer, UNet).
        resolution: the training resolution (resize + center crop).
        classes: the class images of prior preservation; ``None``: none.
        text_encoding: long prompts and ``clip_skip`` of the prompts' embeddings (default: 75 tokens, last layer).

    Returns:
        The latent folders (on every rank).

    Raises:
        DataError: the instance folder is unusable, or a step failed on some rank.
    """
    # every rank checks: the same error everywhere, nobody waits; a URL: its copy in the download cache
    images = instance_images(url_folder(instance_dir, "a folder of images (data.instance_dir, the subject's photos)"))
    cache, device = Path(cache_dir), str(strategy.root_device)
    if classes is not None and classes.prompt.strip() == instance_prompt.strip():
        log.warning(
            "data.class_prompt equals data.instance_prompt (%r): prior preservation then pulls the subject "
            "back to the class; give the instance prompt a rare identifier, e.g. 'a photo of sks cat'",
            instance_prompt,
        )
    sets: dict[str, tuple[list[Path], str | None]] = {"instance": (images, instance_prompt)}
    if classes is not None and object_store.is_store(classes.folder):  # given, not generated: a copy is read
        classes = replace(classes, folder=_class_images_copy(classes))
    elif classes is not None:
        share = (strategy.global_rank, strategy.world_size)
        all_ranks(strategy, "generating class images", lambda: _generate_share(classes, pretrained, *share, device))
        if missing_class_images(classes.folder, classes.count):
            raise DataError(f"{classes.folder}: class images are still missing after generation")
    if classes is not None:
        sets["class"] = ([class_image_path(classes.folder, i) for i in range(classes.count)], None)
    encode = (
        (lambda: _encode(sets, cache, str(pretrained), resolution, device, text_encoding))
        if strategy.is_global_zero
        else None
    )
    all_ranks(strategy, "encoding the instance and class images", encode, worker=0)
    return DreamBoothLatents(cache / "instance" / "latents", cache / "class" / "latents" if classes else None)


def _generate_share(classes: ClassImages, pretrained: str | Path, rank: int, world: int, device: str) -> None:
    """This rank's share of the missing class images, logged with the indices it made."""
    if not missing_class_images(classes.folder, classes.count):
        return
    base = model_folder(pretrained)  # a URL: the whole base model, downloaded once per machine
    made = generate_class_images(classes.folder, classes.prompt, classes.count, base, rank, world,
                                 classes.batch_size, classes.settings, classes.seed, device)  # fmt: skip
    log.info("rank %d of %d generated class images %s", rank, world, made)


def url_folder(path: str | Path, expected: str) -> Path:
    """``path`` itself when local; for a URL, its copy in the download cache (the whole prefix, downloaded once
    per machine, again only when an object changed).

    Raises:
        ObjectStoreError: nothing under the URL or no bucket; names the URL, the endpoint and ``expected``.
    """
    return local_copy(path, expected=expected)


def _class_images_copy(classes: ClassImages) -> Path:
    """The local copy of a URL ``class_dir``, which must hold every class image (it is read, not written).

    Raises:
        DataError: images are missing there (named, with what to do).
    """
    copy = url_folder(classes.folder, f"a folder of {classes.count} class images (data.class_dir)")
    if missing := missing_class_images(copy, classes.count):
        raise DataError(
            f"data.class_dir: {classes.folder} lacks {len(missing)} of {classes.count} class images "
            f"(first: {class_image_path(Path(), missing[0])}); a class_dir URL is read, not written: generate "
            "them with a local class_dir, upload that folder, or lower data.num_class_images"
        )
    return copy


def _encode(
    sets: dict[str, tuple[list[Path], str | None]],
    cache: Path,
    pretrained: str,
    resolution: int,
    device: str,
    text_encoding: TextEncoding | None = None,
) -> None:
    """Raw shards, then latent shards, of each set (in this process; reused while up to date)."""
    part = partial(object_store.join, pretrained)  # a URL: FrozenEncoders loads each folder from its cached copy
    sdxl = object_store.is_folder(part("text_encoder_2"))  # SDXL's shards: both encoders, pooled, size/crop time_ids
    second = {"text_encoder_2_path": part("text_encoder_2"), "tokenizer_2_path": part("tokenizer_2")}
    encoder = LatentShardEncoder(
        FrozenEncoders.from_pretrained(
            part("vae"),
            part("text_encoder"),
            part("tokenizer"),
            device=device,
            **(second if sdxl else {}),
            text_encoding=text_encoding,
        ),
        ResizeCrop(resolution, crop="center"),
        batch_size=16,
    )
    for name, (paths, caption) in sets.items():
        shards = _raw_shards(paths, caption, cache / name)
        precompute_latents_in_process(shards, cache / name / "latents", encoder, recompute_stale=True)
