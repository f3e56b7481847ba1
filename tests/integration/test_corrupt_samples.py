"""Corrupt samples are skipped, counted and logged, and too many fail the run naming the shard:
in the training loader (latent shards) and in precompute (raw shards)."""

import shutil
import tarfile
from pathlib import Path

import pytest

from data_pipelines.raw.writer import write_raw_shards
from data_pipelines.shards.corrupt_samples import TooManyCorruptSamples
from data_pipelines.shards.tar_writer import open_tar_writer
from tests.conftest import FirstDigits, compose_config, tiny_train_overrides
from trainer.cli.precompute import run_precompute
from trainer.cli.train import run_train

pytestmark = pytest.mark.slow


def damage_members(shard: Path, suffix: str, count: int) -> list[str]:
    """Rewrite ``shard`` with the ``suffix`` member of its first ``count`` samples replaced by junk."""
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(shard) as tar:
        for member in tar.getmembers():
            key, _, ext = member.name.partition(".")
            samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    damaged = list(samples)[:count]
    with open_tar_writer(shard) as writer:
        for key, members in samples.items():
            if key in damaged:
                members[suffix] = b"not what it should be"
            writer.write({"__key__": key, **members})
    return damaged


@pytest.fixture()
def damaged_latents(latent_dir, tmp_path):
    folder = tmp_path / "latents"
    shutil.copytree(latent_dir, folder)
    for shard in sorted(folder.glob("*.tar")):  # 3 bad of 32 in each shard; 9 of 96 in all
        damage_members(shard, "latent.npy", 3)
    return folder


def test_training_skips_counts_and_logs_corrupt_latents(damaged_latents, tmp_path):
    overrides = tiny_train_overrides(damaged_latents, tmp_path / "run", steps=3)
    metrics = run_train(compose_config("train", [*overrides, "data.max_bad_fraction=0.2"]))
    assert metrics["global_step"] == 3
    assert metrics["data/skipped_samples"] >= 3  # each shard read holds 3 bad samples
    assert 0 < metrics["data/bad_fraction"] < 0.2
    logged = (next((tmp_path / "run").rglob("metrics.csv"))).read_text()
    assert "data/skipped_samples" in logged


def test_training_fails_naming_the_shard_when_too_many_are_bad(damaged_latents, tmp_path):
    overrides = tiny_train_overrides(damaged_latents, tmp_path / "run", steps=3)
    with pytest.raises(TooManyCorruptSamples, match=r"more than max_bad_fraction=0.01.*shard-00000\d\.tar: sample"):
        run_train(compose_config("train", [*overrides, "data.bad_fraction_min_samples=10"]))


def test_precompute_skips_and_counts_undecodable_images_up_to_the_limit(pretrained_dir, tmp_path):
    raw = tmp_path / "raw"
    write_raw_shards(FirstDigits(20), raw, samples_per_shard=10)
    damage_members(raw / "shard-000001.tar", "png", 2)
    overrides = [f"shards={raw}", f"pretrained={pretrained_dir}", "resolution=32", "batch_size=8"]
    manifest = run_precompute(compose_config("precompute", [*overrides, f"out_dir={tmp_path / 'ok'}"]))
    assert [(s["num_samples"], s["skipped"]) for s in manifest["shards"]] == [(10, 0), (8, 2)]
    with pytest.raises(TooManyCorruptSamples, match=r"2 of 12 samples read.*shard-000001\.tar: sample 000000011"):
        run_precompute(
            compose_config("precompute", [*overrides, f"out_dir={tmp_path / 'strict'}", "bad_fraction_min_samples=100"])
        )
    assert not list((tmp_path / "strict").glob("shard-000001.tar*")), "no partial shard is left"
