"""Precompute is resumable, refuses stale latents, and splits work over processes."""

import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest

from data_pipelines.latents.format import ENTRY_SUFFIX, LatentManifest
from data_pipelines.latents.precompute import StaleLatentsError
from data_pipelines.raw.writer import write_raw_shards
from tests.conftest import FirstDigits, compose_config
from trainer.cli.precompute import run_precompute

pytestmark = pytest.mark.slow


def precompute(raw, out, pretrained, *extra):
    return run_precompute(
        compose_config(
            "precompute",
            [f"shards={raw}", f"out_dir={out}", f"pretrained={pretrained}", "resolution=32", "batch_size=16", *extra],
        )
    )


def digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.tar"))}


def test_rerun_reuses_complete_shards(raw_shards, pretrained_dir, tmp_path, caplog):
    precompute(raw_shards, tmp_path, pretrained_dir)
    before = {p.name: p.stat().st_mtime_ns for p in tmp_path.glob("*.tar")}
    with caplog.at_level("INFO"):
        manifest = precompute(raw_shards, tmp_path, pretrained_dir)
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.glob("*.tar")} == before
    assert caplog.text.count("complete and up to date, reused") == 3
    assert sum(s["num_samples"] for s in manifest["shards"]) == 96


@pytest.mark.parametrize("change", ["resolution", "edited_image", "vae"])
def test_stale_latents_are_refused_then_recomputed(change, raw_shards, pretrained_dir, tmp_path):
    raw, pretrained = tmp_path / "raw", tmp_path / "pretrained"
    shutil.copytree(raw_shards, raw)
    shutil.copytree(pretrained_dir, pretrained)
    out = tmp_path / "latents"
    precompute(raw, out, pretrained)
    extra, expected = [], ""
    if change == "resolution":
        extra, expected = ["resolution=64"], "transform resolution (32 -> 64) changed"
    elif change == "edited_image":
        write_raw_shards(FirstDigits(33), tmp_path / "edited", samples_per_shard=32)
        shutil.copy(tmp_path / "edited" / "shard-000001.tar", raw / "shard-000001.tar")  # now 1 digit, not 32
        expected = "shard-000001.tar: the input shard's content changed"
    else:
        config = json.loads((pretrained / "vae" / "config.json").read_text())
        config["scaling_factor"] = 0.5  # another VAE (same weights, other scaling)
        (pretrained / "vae" / "config.json").write_text(json.dumps(config))
        expected = "the VAE changed"
    with pytest.raises(StaleLatentsError, match="recompute_stale=true") as refused:
        precompute(raw, out, pretrained, *extra)
    assert expected in str(refused.value)
    manifest = precompute(raw, out, pretrained, *extra, "recompute_stale=true")
    assert manifest["resolution"] == (64 if change == "resolution" else 32)
    if change == "edited_image":
        assert manifest["shards"][1]["num_samples"] == 1
    precompute(raw, out, pretrained, *extra)  # now up to date: no error


def test_killed_run_resumes_to_the_same_output(pretrained_dir, tmp_path):
    raw = tmp_path / "raw"
    write_raw_shards(FirstDigits(12 * 16), raw, samples_per_shard=16)
    overrides = [f"shards={raw}", f"pretrained={pretrained_dir}", "resolution=128", "batch_size=16"]
    command = [str(Path(sys.executable).parent / "lf-precompute"), *overrides, f"hydra.run.dir={tmp_path / 'hydra'}"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}

    subprocess.run([*command, f"out_dir={tmp_path / 'whole'}"], env=env, check=True, capture_output=True)

    killed = tmp_path / "killed"
    process = subprocess.Popen(
        [*command, f"out_dir={killed}"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 120
    while not list(killed.glob(f"*{ENTRY_SUFFIX}")) and time.time() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    done = list(killed.glob(f"*{ENTRY_SUFFIX}"))
    assert 0 < len(done) < 12, "killed part-way"
    assert not (killed / "manifest.json").exists()
    for shard in killed.glob("*.tar"):  # every .tar name holds a complete shard; partial ones are *.tar.tmp
        assert shard.stat().st_size > 0

    subprocess.run([*command, f"out_dir={killed}"], env=env, check=True, capture_output=True)
    assert digests(killed) == digests(tmp_path / "whole")
    assert not list(killed.glob("*.tmp"))
    whole = LatentManifest.load(tmp_path / "whole")
    resumed = LatentManifest.load(killed)
    assert [s.cache_key for s in resumed.shards] == [s.cache_key for s in whole.shards]


@pytest.mark.dist
def test_two_processes_write_disjoint_complete_outputs(raw_shards, pretrained_dir, tmp_path):
    torchrun = Path(sys.executable).parent / "torchrun"
    result = subprocess.run(
        [
            str(torchrun),
            "--standalone",
            "--nproc_per_node=2",
            "-m",
            "trainer.cli.precompute",
            f"shards={raw_shards}",
            f"out_dir={tmp_path / 'latents'}",
            f"pretrained={pretrained_dir}",
            "resolution=32",
            f"hydra.run.dir={tmp_path / 'hydra'}",
        ],
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    manifest = LatentManifest.load(tmp_path / "latents")
    assert [s.name for s in manifest.shards] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    assert sum(s.num_samples for s in manifest.shards) == 96
    single = tmp_path / "single"
    precompute(raw_shards, single, pretrained_dir)
    assert digests(tmp_path / "latents") == digests(single)
    logs = {p.name: p.read_text() for p in (tmp_path / "hydra").glob("*.log")}
    assert logs, "each rank logged"


def read_latents(folder: Path) -> dict[str, np.ndarray]:
    """Every ``KEY.latent.npy`` of a latent-shard folder, by key."""

    arrays = {}
    for shard in sorted(folder.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".latent.npy"):
                    arrays[member.name] = np.load(io.BytesIO(tar.extractfile(member).read()))
    return arrays


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_encoders_give_the_float32_latents_to_their_precision(
    raw_shards, pretrained_dir, tmp_path, dtype
):
    import numpy as np

    precompute(raw_shards, tmp_path / "fp32", pretrained_dir, "device=cpu")
    manifest = precompute(raw_shards, tmp_path / dtype, pretrained_dir, "device=cpu", f"dtype={dtype}")
    assert manifest["vae"]["extra"]["dtype"] == dtype, "the encoders' dtype is in the manifest and the cache key"
    reference, half = read_latents(tmp_path / "fp32"), read_latents(tmp_path / dtype)
    assert half.keys() == reference.keys() and len(half) == 96
    scale = max(float(np.abs(a).max()) for a in reference.values())
    worst = max(float(np.abs(half[k].astype(np.float32) - reference[k].astype(np.float32)).max()) for k in half)
    tolerance = 2**-6 if dtype == "bfloat16" else 2**-9  # a few units of the last place, relative to the range
    assert 0 < worst <= tolerance * scale, (worst, scale)


def test_loader_workers_give_the_same_shards(raw_shards, pretrained_dir, tmp_path):
    precompute(raw_shards, tmp_path / "serial", pretrained_dir, "device=cpu", "num_workers=0")
    precompute(raw_shards, tmp_path / "workers", pretrained_dir, "device=cpu", "num_workers=2")
    assert digests(tmp_path / "workers") == digests(tmp_path / "serial")
