"""Precompute: raw shards -> latent shards, one output shard per input shard, written atomically."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import webdataset as wds

from data_pipelines.atomic import atomic_path
from data_pipelines.frozen_encoders import FrozenEncoders
from data_pipelines.image_transforms import ResizeCrop
from data_pipelines.latent_format import (
    LatentManifest,
    LatentSample,
    ShardEntry,
    encode_latent_sample,
    save_uncond_embedding,
)
from data_pipelines.raw_format import decode_raw_sample
from data_pipelines.shard_writer import open_tar_writer
from data_pipelines.streaming import SkipCounter

log = logging.getLogger(__name__)


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class _Pending:
    key: str
    pixels: torch.Tensor  # (3, R, R)
    caption: str
    meta: dict[str, Any]


class LatentShardEncoder:
    """Encode raw shards into latent shards with frozen encoders.

    Args:
        encoders: the frozen VAE and text encoder.
        transform: preprocessing of each image to the training resolution.
        batch_size: images per encoder call.
        max_skipped: corrupt samples tolerated per run before it fails.
    """

    def __init__(self, encoders: FrozenEncoders, transform: ResizeCrop, batch_size: int = 64, max_skipped: int = 100):
        self.encoders = encoders
        self.transform = transform
        self.batch_size = batch_size
        self.skips = SkipCounter(max_skipped)

    def encode_batch(self, batch: list[_Pending]) -> list[LatentSample]:
        """Encode one batch of preprocessed samples."""
        latents = self.encoders.encode_images(torch.stack([p.pixels for p in batch]))  # (B, C, h, w)
        texts = self.encoders.encode_captions([p.caption for p in batch])  # (B, T, D)
        latents, texts = latents.float().cpu().numpy(), texts.float().cpu().numpy()
        return [
            LatentSample(p.key, latent, text, p.caption, p.meta)
            for p, latent, text in zip(batch, latents, texts, strict=True)
        ]

    def encode_shard(self, source: str, target: Path) -> ShardEntry:
        """Encode every sample of raw shard ``source`` into latent shard ``target``."""
        skipped_before = self.skips.skipped
        count = 0
        with atomic_path(target) as tmp, open_tar_writer(tmp) as writer:
            batch: list[_Pending] = []
            dataset = wds.DataPipeline(wds.SimpleShardList([source]), wds.tarfile_to_samples(handler=self.skips))
            for raw in dataset:
                try:
                    key, image, caption, meta = decode_raw_sample(raw)
                except Exception as error:  # CorruptSampleError, or bad JSON metadata
                    self.skips(error)
                    continue
                pixels, info = self.transform(image)
                batch.append(_Pending(key, pixels, caption, {**meta, **info}))
                if len(batch) == self.batch_size:
                    count += self._write(writer, batch)
                    batch = []
            if batch:
                count += self._write(writer, batch)
        return ShardEntry(
            name=target.name,
            num_samples=count,
            source=str(Path(source).resolve()),
            source_sha256=file_sha256(source),
            skipped=self.skips.skipped - skipped_before,
        )

    def _write(self, writer: wds.TarWriter, batch: list[_Pending]) -> int:
        for sample in self.encode_batch(batch):
            writer.write(encode_latent_sample(sample))
        return len(batch)

    def latent_shape(self) -> list[int]:
        """``[C, h, w]`` of one latent at the transform's resolution."""
        probe = torch.zeros(1, 3, self.transform.resolution, self.transform.resolution)
        return list(self.encoders.encode_images(probe).shape[1:])

    def text_shape_and_uncond(self) -> tuple[list[int], Any]:
        """``[T, D]`` of one text embedding and the empty caption's embedding ``(T, D)``."""
        uncond = self.encoders.encode_captions([""])[0].float().cpu().numpy()
        return list(uncond.shape), uncond


def precompute_latents(shards: list[str], out_dir: str | Path, encoder: LatentShardEncoder) -> LatentManifest:
    """Encode each raw shard into ``out_dir`` (same file name) and write the manifest.

    Args:
        shards: raw shard paths.
        out_dir: output folder.
        encoder: the configured encoder.

    Returns:
        The manifest written to ``out_dir/manifest.json``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = [Path(s).name for s in shards]
    if len(set(names)) != len(names):
        raise ValueError(f"input shards share file names; give shards with distinct names: {names}")
    text_shape, uncond = encoder.text_shape_and_uncond()
    manifest = LatentManifest(
        resolution=encoder.transform.resolution,
        latent_shape=encoder.latent_shape(),
        text_shape=text_shape,
        vae=encoder.encoders.vae_info,
        text_encoder=encoder.encoders.text_encoder_info,
        tokenizer_path=encoder.encoders.tokenizer_path,
        transforms=encoder.transform.settings(),
    )
    for index, source in enumerate(shards):
        entry = encoder.encode_shard(source, out / names[index])
        manifest.shards.append(entry)
        log.info(
            "shard %d/%d: %s -> %d samples (%d skipped)",
            index + 1,
            len(shards),
            source,
            entry.num_samples,
            entry.skipped,
        )
    save_uncond_embedding(out, uncond)
    manifest.save(out)
    return manifest
