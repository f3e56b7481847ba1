"""Latent-shard loading: latentforge's loader against the idiomatic webdataset pipeline.

Both read the same latent shards (written by ``data_pipelines``) with batch 128 and a shuffle
buffer of 500, for several epochs of a dataset the size of the digits demo, in one process.

* baseline: ``wds.WebDataset(resampled=True).shuffle().decode().to_tuple().batched().with_epoch()``
  — every epoch restarts the pipeline (refilling the shuffle buffer and dropping what it held)
  and ``np.load`` parses every ``.npy`` header.
* contender: ``LatentShardDataModule.train_dataloader()`` — epochs continue one stream, and
  ``.npy`` members whose header matches the manifest's shape skip header parsing.

A second pair compares reading shards written with webdataset's ``TarWriter`` defaults (a
fractional mtime, so a PAX header per member) against latentforge's writer (whole-second mtime).

Run: ``python bench/bench_latent_loader.py``. The last line is the loader ratio.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import webdataset as wds

from data_pipelines.datamodules import LatentShardDataModule
from data_pipelines.latent_format import (
    EncoderInfo,
    LatentManifest,
    LatentSample,
    ShardEntry,
    encode_latent_sample,
    save_uncond_embedding,
)
from data_pipelines.shard_writer import open_tar_writer

SAMPLES, PER_SHARD, BATCH, BUFFER, EPOCHS = 1440, 240, 128, 500, 6
LATENT, TEXT = (4, 8, 8), (77, 32)


def write_shards(folder: Path, writer_factory) -> None:
    rng = np.random.default_rng(0)
    entries = []
    for shard in range(SAMPLES // PER_SHARD):
        name = f"shard-{shard:06d}.tar"
        with writer_factory(folder / name) as writer:
            for i in range(PER_SHARD):
                key = f"{shard * PER_SHARD + i:09d}"
                sample = LatentSample(key, rng.standard_normal(LATENT), rng.standard_normal(TEXT), "c")
                writer.write(encode_latent_sample(sample))
        entries.append(ShardEntry(name, PER_SHARD, name, ""))
    info = EncoderInfo("", "", "")
    LatentManifest(32, list(LATENT), list(TEXT), info, info, "", {}, entries).save(folder)
    save_uncond_embedding(folder, np.zeros(TEXT))


def baseline_loader(folder: Path):
    urls = sorted(str(p) for p in folder.glob("*.tar"))
    epoch = int(np.ceil(SAMPLES / BATCH))
    return (
        wds.WebDataset(urls, resampled=True, shardshuffle=False)
        .shuffle(BUFFER)
        .decode()
        .to_tuple("latent.npy", "text.npy")
        .batched(BATCH, partial=False)
        .with_epoch(epoch)
    )


def contender_loader(folder: Path):
    return LatentShardDataModule(str(folder), batch_size=BATCH, num_workers=0, shuffle_buffer=BUFFER).train_dataloader()


def seconds_per_batch(loader) -> float:
    next(iter(loader))  # warm up
    start, batches = time.perf_counter(), 0
    for _ in range(EPOCHS):
        for _batch in loader:
            batches += 1
    return (time.perf_counter() - start) / batches


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        ours, default_tar = Path(tmp) / "ours", Path(tmp) / "default"
        ours.mkdir(), default_tar.mkdir()
        write_shards(ours, open_tar_writer)
        write_shards(default_tar, lambda path: wds.TarWriter(str(path), encoder=False))

        pax = seconds_per_batch(contender_loader(default_tar))
        whole = seconds_per_batch(contender_loader(ours))
        print(f"shards from TarWriter defaults (PAX headers): {pax * 1e3:7.1f} ms/batch")
        print(f"shards from latentforge's writer:             {whole * 1e3:7.1f} ms/batch")
        print(f"tar header ratio (PAX / whole-second mtime): {pax / whole:.2f}x")

        baseline = seconds_per_batch(baseline_loader(ours))
        contender = seconds_per_batch(contender_loader(ours))
        print(f"baseline  (webdataset with_epoch + decode): {baseline * 1e3:7.1f} ms/batch")
        print(f"contender (LatentShardDataModule):          {contender * 1e3:7.1f} ms/batch")
        print(f"loader speed-up (baseline / contender): {baseline / contender:.2f}x")


if __name__ == "__main__":
    main()
