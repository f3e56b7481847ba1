"""Precompute: raw shards -> latent shards, one output shard per input shard.

Resumable and cache-correct: each output shard is written under a temporary name and renamed when
complete, then recorded (``shard-NNNNNN.entry.json``) with its :class:`CacheKey`. A rerun reuses a
shard whose recorded key equals the current one, encodes missing ones, and refuses stale ones
(an edited input shard, another VAE, text encoder or tokenizer, other transforms) with a message
saying what changed, unless ``recompute_stale`` is set. Under torchrun, rank ``r`` of ``w`` takes
input shards ``r, r + w, ...``; rank 0 writes the manifest once every rank is done.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import webdataset as wds

from data_pipelines.atomic import atomic_path
from data_pipelines.buckets import BucketResizeCrop
from data_pipelines.errors import DataError
from data_pipelines.frozen_encoders import FrozenEncoders
from data_pipelines.image_transforms import ResizeCrop
from data_pipelines.latent_format import (
    CacheKey,
    LatentManifest,
    LatentSample,
    ShardEntry,
    encode_latent_sample,
    load_entry,
    save_entry,
    save_uncond_embedding,
)
from data_pipelines.raw_format import decode_raw_sample
from data_pipelines.shard_writer import open_tar_writer
from data_pipelines.streaming import SkipCounter

log = logging.getLogger(__name__)


class StaleLatentsError(DataError):
    """Latent shards whose cache key does not match the current settings."""


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


Transform = ResizeCrop | BucketResizeCrop


@dataclass
class _Pending:
    key: str
    pixels: torch.Tensor  # (3, h, w): the resolution, or the sample's bucket size
    caption: str
    meta: dict[str, Any]


class LatentShardEncoder:
    """Encode raw shards into latent shards with frozen encoders.

    Args:
        encoders: the frozen VAE and text encoder.
        transform: preprocessing of each image to the training resolution, or into its
            aspect-ratio bucket (:class:`~data_pipelines.buckets.BucketResizeCrop`).
        batch_size: images per encoder call (each call encodes images of one size).
        skips: counts corrupt samples (an undecodable image, a missing member) and fails the run
            when too many are bad; default: more than 1% of at least 1,000 samples.
    """

    def __init__(
        self,
        encoders: FrozenEncoders,
        transform: Transform,
        batch_size: int = 64,
        skips: SkipCounter | None = None,
    ) -> None:
        self.encoders = encoders
        self.transform = transform
        self.batch_size = batch_size
        self.skips = skips or SkipCounter()

    def cache_key(self, source_sha256: str) -> CacheKey:
        """The key of a latent shard made from an input shard with this content hash."""
        return CacheKey(
            source_sha256=source_sha256,
            vae=self.encoders.vae_info.fingerprint,
            text_encoder=self.encoders.text_encoder_info.fingerprint,
            tokenizer=self.encoders.tokenizer_fingerprint,
            transforms=self.transform.settings(),
        )

    def encode_batch(self, batch: list[_Pending]) -> list[LatentSample]:
        """Encode one batch of preprocessed samples."""
        latents = self.encoders.encode_images(torch.stack([p.pixels for p in batch]))  # (B, C, h, w)
        texts = self.encoders.encode_captions([p.caption for p in batch])  # (B, T, D)
        latents, texts = latents.float().cpu().numpy(), texts.float().cpu().numpy()
        return [
            LatentSample(p.key, latent, text, p.caption, p.meta)
            for p, latent, text in zip(batch, latents, texts, strict=True)
        ]

    def encode_shard(self, source: str, target: Path, key: CacheKey) -> ShardEntry:
        """Encode every sample of raw shard ``source`` into latent shard ``target`` and record it.

        Samples wait in one batch per image size (one per bucket, when bucketed; at most
        ``buckets x batch_size`` images held); a full batch is encoded and written at once, the
        rest at the end of the shard, smallest size first.
        """
        skipped_before = self.skips.skipped
        count = 0
        with atomic_path(target) as tmp, open_tar_writer(tmp) as writer:
            batches: dict[tuple[int, ...], list[_Pending]] = {}
            dataset = wds.DataPipeline(wds.SimpleShardList([source]), wds.tarfile_to_samples(handler=self.skips))
            for raw in dataset:
                try:
                    sample_key, image, caption, meta = decode_raw_sample(raw)
                except Exception as error:  # CorruptSampleError, or bad JSON metadata
                    self.skips(error)
                    continue
                self.skips.count_good()
                pixels, info = self.transform(image)
                batch = batches.setdefault(tuple(pixels.shape), [])
                batch.append(_Pending(sample_key, pixels, caption, {**meta, **info}))
                if len(batch) == self.batch_size:
                    count += self._write(writer, batch)
                    batch.clear()
            for shape in sorted(batches):
                if batches[shape]:
                    count += self._write(writer, batches[shape])
        entry = ShardEntry(
            name=target.name,
            num_samples=count,
            source=str(Path(source).resolve()),
            source_sha256=key.source_sha256,
            skipped=self.skips.skipped - skipped_before,
            cache_key=asdict(key),
        )
        save_entry(target, entry)
        return entry

    def _write(self, writer: wds.TarWriter, batch: list[_Pending]) -> int:
        for sample in self.encode_batch(batch):
            writer.write(encode_latent_sample(sample))
        return len(batch)

    def latent_shape(self, height: int | None = None, width: int | None = None) -> list[int]:
        """``[C, h, w]`` of one latent of a ``height`` x ``width`` image (default: the resolution square)."""
        height = height or self.transform.resolution
        probe = torch.zeros(1, 3, height, width or height)
        return list(self.encoders.encode_images(probe).shape[1:])

    def bucket_latent_shapes(self) -> list[list[int]]:
        """``[C, h, w]`` of each bucket's latents (empty when not bucketed)."""
        if not isinstance(self.transform, BucketResizeCrop):
            return []
        channels = self.latent_shape()[0]
        factor = 2 ** (len(self.encoders.vae.config.block_out_channels) - 1)  # the VAE's downsampling factor
        for height, width in self.transform.buckets.sizes:
            if height % factor or width % factor:
                raise DataError(
                    f"bucket {height}x{width} is not a multiple of the VAE's factor {factor}; "
                    "use a bucket step that is a multiple of it"
                )
        return [[channels, height // factor, width // factor] for height, width in self.transform.buckets.sizes]

    def text_shape_and_uncond(self) -> tuple[list[int], Any]:
        """``[T, D]`` of one text embedding and the empty caption's embedding ``(T, D)``."""
        uncond = self.encoders.encode_captions([""])[0].float().cpu().numpy()
        return list(uncond.shape), uncond


@dataclass
class PrecomputePlan:
    """What a run does with each of its input shards (by output name)."""

    reuse: list[str] = field(default_factory=list)
    encode: list[str] = field(default_factory=list)
    stale: dict[str, list[str]] = field(default_factory=dict)  # name -> what changed


def plan_shards(out: Path, names: list[str], keys: dict[str, CacheKey]) -> PrecomputePlan:
    """Sort output shards into reusable (recorded with the same key), missing, and stale."""
    plan = PrecomputePlan()
    for name in names:
        entry = load_entry(out / name)
        recorded = entry.key() if entry else None
        if entry is None:
            plan.encode.append(name)
        elif recorded == keys[name]:
            plan.reuse.append(name)
        else:
            plan.stale[name] = keys[name].differences(recorded) if recorded else ["no cache key was recorded"]
    return plan


def _rank_and_world() -> tuple[int, int]:
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def precompute_latents(
    shards: list[str], out_dir: str | Path, encoder: LatentShardEncoder, recompute_stale: bool = False
) -> LatentManifest | None:
    """Encode this rank's input shards into ``out_dir`` (same file names); rank 0 writes the manifest.

    Args:
        shards: all raw shard paths (every rank gets the same list).
        out_dir: output folder.
        encoder: the configured encoder.
        recompute_stale: re-encode stale shards instead of refusing them.

    Returns:
        The manifest on rank 0, ``None`` on other ranks.

    Raises:
        StaleLatentsError: some of this rank's shards are stale and ``recompute_stale`` is off.
    """
    remote = [s for s in shards if not Path(s).is_file()]
    if remote:
        raise DataError(
            f"precompute reads local shard files (it hashes each for the cache key); not local: {remote[:3]}"
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = [Path(s).name for s in shards]
    if len(set(names)) != len(names):
        raise DataError(f"input shards share file names; give shards with distinct names: {names}")
    rank, world = _rank_and_world()
    mine = {
        name: source for index, (name, source) in enumerate(zip(names, shards, strict=True)) if index % world == rank
    }
    keys = {name: encoder.cache_key(file_sha256(source)) for name, source in mine.items()}
    plan = plan_shards(out, list(mine), keys)
    if plan.stale and not recompute_stale:
        details = "; ".join(f"{name}: {', '.join(changes)} changed" for name, changes in sorted(plan.stale.items()))
        raise StaleLatentsError(
            f"{out}: {len(plan.stale)} latent shard(s) do not match the current settings ({details}). "
            "Use another out_dir, or set recompute_stale=true to encode them again."
        )
    for name in plan.reuse:
        log.info("%s: complete and up to date, reused", name)
    for name in plan.encode + sorted(plan.stale):
        entry = encoder.encode_shard(mine[name], out / name, keys[name])
        log.info("%s: %d samples from %s (%d skipped)", name, entry.num_samples, mine[name], entry.skipped)
    if world > 1:
        _barrier()
    if rank != 0:
        return None
    return _write_manifest(out, names, encoder)


def _barrier() -> None:
    if not dist.is_initialized():
        dist.init_process_group("gloo")
    dist.barrier()


def _write_manifest(out: Path, names: list[str], encoder: LatentShardEncoder) -> LatentManifest:
    entries = [load_entry(out / name) for name in names]
    missing = [name for name, entry in zip(names, entries, strict=True) if entry is None]
    if missing:
        raise DataError(f"{out}: shards {missing[:3]} were not written by any rank")
    text_shape, uncond = encoder.text_shape_and_uncond()
    manifest = LatentManifest(
        resolution=encoder.transform.resolution,
        latent_shape=encoder.latent_shape(),
        text_shape=text_shape,
        vae=encoder.encoders.vae_info,
        text_encoder=encoder.encoders.text_encoder_info,
        tokenizer_path=encoder.encoders.tokenizer_path,
        transforms=encoder.transform.settings(),
        shards=entries,  # type: ignore[arg-type]
        bucket_sizes=encoder.transform.buckets.to_list() if isinstance(encoder.transform, BucketResizeCrop) else [],
        bucket_latent_shapes=encoder.bucket_latent_shapes(),
    )
    save_uncond_embedding(out, uncond)
    manifest.save(out)
    return manifest
