"""Shared by the loader benchmarks: synthetic latent shards, and the two loaders compared."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import webdataset as wds

from data_pipelines.latents.format import (
    EncoderInfo,
    LatentManifest,
    LatentSample,
    ShardEntry,
    encode_latent_sample,
    save_uncond_embedding,
)
from data_pipelines.loading.datamodules import LatentShardDataModule
from data_pipelines.shards.tar_writer import open_tar_writer


def write_latent_shards(
    folder: Path,
    samples: int,
    per_shard: int,
    latent_shape: tuple[int, ...],
    text_shape: tuple[int, ...],
    writer_factory: Callable[[Path], wds.TarWriter] = open_tar_writer,
    fresh_arrays: bool = True,
) -> None:
    """Write ``samples`` random latent samples in shards of ``per_shard``, with a manifest.

    ``fresh_arrays=False`` reuses one latent and one text array (faster to write; speed is the same).
    """
    rng = np.random.default_rng(0)
    latent, text = rng.standard_normal(latent_shape), rng.standard_normal(text_shape)
    entries = []
    for shard in range(samples // per_shard):
        name = f"shard-{shard:06d}.tar"
        with writer_factory(folder / name) as writer:
            for i in range(per_shard):
                if fresh_arrays:
                    latent, text = rng.standard_normal(latent_shape), rng.standard_normal(text_shape)
                writer.write(encode_latent_sample(LatentSample(f"{shard * per_shard + i:09d}", latent, text, "c")))
        entries.append(ShardEntry(name, per_shard, name, ""))
    info = EncoderInfo("", "", "")
    LatentManifest(0, list(latent_shape), list(text_shape), info, info, "", {}, entries).save(folder)
    save_uncond_embedding(folder, np.zeros(text_shape))


def webdataset_idiom(folder: Path, samples: int, batch: int, buffer: int):
    """The baseline: webdataset's documented pipeline, ``with_epoch`` restarting it every epoch."""
    urls = sorted(str(p) for p in folder.glob("*.tar"))
    return (
        wds.WebDataset(urls, resampled=True, shardshuffle=False)
        .shuffle(buffer)
        .decode()
        .to_tuple("latent.npy", "text.npy")
        .batched(batch, partial=False)
        .with_epoch(math.ceil(samples / batch))
    )


def latentforge_loader(folder: Path, batch: int, buffer: int):
    """The contender: ``LatentShardDataModule``'s training loader, in the main process."""
    return LatentShardDataModule(str(folder), batch_size=batch, num_workers=0, shuffle_buffer=buffer).train_dataloader()
