"""Latent-shard loading from an S3 server against the same shards on local disk.

The same synthetic latent shards (SD 512 px shapes: 4×64×64 latents, 77×768 text embeddings,
float16, about 150 kB a sample) are read by ``LatentShardDataModule``'s training loader from a
local folder (baseline) and from ``s3://`` on a local S3 server (contender: moto's server mode in
a process of its own, on 127.0.0.1; objects streamed by s3fs in 8 MB ranged reads), with
``num_workers`` 0 and 2. The S3 server here is a Python process on the same machine: it measures
the cost of the S3 path (HTTP, s3fs, ranged reads) rather than a cloud store's bandwidth.

Then whether prefetching keeps a GPU fed: a consumer that takes a batch every ``STEP_S`` seconds (one
H200's training step at 512 px, batch 32: 97 img/s measured, BENCHMARKS.md) while 2 loader workers
prefetch; the time it waits for its next batch is what the GPU would idle, printed per step and as a
fraction of the run, from local disk and from S3.

Run: ``python bench/bench_s3_loader.py``. The last line is the ratio (local / S3 samples per second)
with loader workers.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from synthetic_latents import write_latent_shards

from data_pipelines.loading.datamodules import LatentShardDataModule
from lf_common import object_store

SAMPLES, PER_SHARD, BATCH, BUFFER, EPOCHS = 960, 120, 32, 200, 2
LATENT, TEXT = (4, 64, 64), (77, 768)
STEP_S, FED_STEPS = BATCH / 97.1, 24  # one H200's 512 px step (batch 32, bf16, SD 1.5's UNet); steps timed


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server() -> tuple[subprocess.Popen, str]:
    """moto's S3 server in a process of its own; the process and its endpoint URL."""
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    for _ in range(200):
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return server, f"http://127.0.0.1:{port}"
        time.sleep(0.05)
    server.kill()
    raise RuntimeError("the S3 server did not start")


def samples_per_second(folder: str, workers: int) -> float:
    """Samples/s of the training loader over ``EPOCHS`` epochs (after a warm-up batch)."""
    module = LatentShardDataModule(folder, batch_size=BATCH, num_workers=workers, shuffle_buffer=BUFFER)
    loader = module.train_dataloader()
    next(iter(loader))
    start, samples = time.perf_counter(), 0
    for _ in range(EPOCHS):
        for batch in loader:
            samples += batch["latents"].shape[0]
    return samples / (time.perf_counter() - start)


def data_wait(folder: str, workers: int) -> tuple[float, float]:
    """A consumer taking a batch every ``STEP_S`` s for ``FED_STEPS`` steps (after a warm-up batch): the mean
    wait for a batch (s) and the fraction of the run spent waiting (what a GPU would idle)."""
    module = LatentShardDataModule(folder, batch_size=BATCH, num_workers=workers, shuffle_buffer=BUFFER)
    iterator = iter(module.train_dataloader())
    next(iterator)
    waited, start = 0.0, time.perf_counter()
    for _ in range(FED_STEPS):
        before = time.perf_counter()
        next(iterator)
        waited += time.perf_counter() - before
        time.sleep(STEP_S)  # the training step
    return waited / FED_STEPS, waited / (time.perf_counter() - start)


def main() -> None:
    server, endpoint = start_server()
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
    object_store.set_endpoint_url(endpoint)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            write_latent_shards(Path(tmp), SAMPLES, PER_SHARD, LATENT, TEXT, fresh_arrays=False)
            fs, _ = object_store.filesystem("s3://bench")
            fs.mkdir("bench")
            for path in sorted(Path(tmp).iterdir()):
                object_store.upload(path, f"s3://bench/latents/{path.name}")
            size = sum(p.stat().st_size for p in Path(tmp).glob("*.tar")) / 1e6
            print(f"{SAMPLES} samples in {SAMPLES // PER_SHARD} shards, {size:.0f} MB; batch {BATCH}, {EPOCHS} epochs")
            for workers in (0, 2):
                local = samples_per_second(tmp, workers)
                remote = samples_per_second("s3://bench/latents", workers)
                print(
                    f"num_workers={workers}: local disk {local:8.0f} samples/s, S3 {remote:8.0f} samples/s "
                    f"({local / remote:.2f}x)"
                )
            for name, folder in (("local disk", tmp), ("S3", "s3://bench/latents")):
                wait, fraction = data_wait(folder, workers=2)
                print(
                    f"fed at {BATCH / STEP_S:.0f} img/s (step {STEP_S * 1000:.0f} ms), 2 workers, {name}: "
                    f"waits {wait * 1000:6.1f} ms a step, {fraction:.1%} of the run"
                )
            print(f"local / S3 samples/s with 2 loader workers: {local / remote:.2f}x")
    finally:
        server.terminate()
        server.wait()


if __name__ == "__main__":
    main()
