"""Loader throughput at SD 2.x shapes: can one loader process keep GPUs fed?

Each sample is a 4×64×64 float16 latent (512 px images) and a 77×1024 float16 text embedding
(OpenCLIP ViT-H), about 190 KB. One process (``num_workers=0``) reads 1,024 samples in 8 shards
for 3 epochs, batch 64.

Contender: ``LatentShardDataModule``; baseline: the idiomatic webdataset pipeline
(``resampled .shuffle().decode().to_tuple().batched().with_epoch()``) on the same shards. The
reference rate is what SD2-base training consumes: about 36 images/s per A100 at 512 px
(MosaicML's diffusion README); the issue's goal is one loader process feeding >= 20 GPUs (720/s).

Run: ``python bench/bench_loader_sd2_shapes.py``. The last line is the ratio contender / baseline.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from synthetic_latents import latentforge_loader, webdataset_idiom, write_latent_shards

SAMPLES, PER_SHARD, BATCH, BUFFER, EPOCHS = 1024, 128, 64, 256, 3
LATENT, TEXT = (4, 64, 64), (77, 1024)
A100_IMAGES_PER_SECOND_512PX = 36.0


def samples_per_second(loader) -> float:
    next(iter(loader))
    start, samples = time.perf_counter(), 0
    for _ in range(EPOCHS):
        for batch in loader:
            samples += len(batch["latents"]) if isinstance(batch, dict) else len(batch[0])
    return samples / (time.perf_counter() - start)


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        write_latent_shards(folder, SAMPLES, PER_SHARD, LATENT, TEXT, fresh_arrays=False)
        baseline_loader = webdataset_idiom(folder, SAMPLES, BATCH, BUFFER)
        contender_loader = latentforge_loader(folder, BATCH, BUFFER)
        baseline = samples_per_second(baseline_loader)
        contender = samples_per_second(contender_loader)
    print(f"baseline  (webdataset with_epoch + decode): {baseline:8.0f} samples/s")
    print(f"contender (LatentShardDataModule):          {contender:8.0f} samples/s")
    print(f"one contender process feeds {contender / A100_IMAGES_PER_SECOND_512PX:.0f} A100s at 512 px (goal >= 20)")
    print(f"loader speed-up (contender / baseline): {contender / baseline:.2f}x")


if __name__ == "__main__":
    main()
