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

import webdataset as wds
from synthetic_latents import latentforge_loader, webdataset_idiom, write_latent_shards

from data_pipelines.shards.tar_writer import open_tar_writer

SAMPLES, PER_SHARD, BATCH, BUFFER, EPOCHS = 1440, 240, 128, 500, 6
LATENT, TEXT = (4, 8, 8), (77, 32)


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
        write_latent_shards(ours, SAMPLES, PER_SHARD, LATENT, TEXT, open_tar_writer)
        write_latent_shards(
            default_tar, SAMPLES, PER_SHARD, LATENT, TEXT, lambda p: wds.TarWriter(str(p), encoder=False)
        )

        pax = seconds_per_batch(latentforge_loader(default_tar, BATCH, BUFFER))
        whole = seconds_per_batch(latentforge_loader(ours, BATCH, BUFFER))
        print(f"shards from TarWriter defaults (PAX headers): {pax * 1e3:7.1f} ms/batch")
        print(f"shards from latentforge's writer:             {whole * 1e3:7.1f} ms/batch")
        print(f"tar header ratio (PAX / whole-second mtime): {pax / whole:.2f}x")

        baseline = seconds_per_batch(webdataset_idiom(ours, SAMPLES, BATCH, BUFFER))
        contender = seconds_per_batch(latentforge_loader(ours, BATCH, BUFFER))
        print(f"baseline  (webdataset with_epoch + decode): {baseline * 1e3:7.1f} ms/batch")
        print(f"contender (LatentShardDataModule):          {contender * 1e3:7.1f} ms/batch")
        print(f"loader speed-up (baseline / contender): {baseline / contender:.2f}x")


if __name__ == "__main__":
    main()
