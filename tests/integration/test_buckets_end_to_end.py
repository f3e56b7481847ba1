"""Aspect-ratio buckets end to end: precompute images of varied aspect into buckets, stream batches
of one shape each, train through lf-train, and a changed bucket set makes the cache stale."""

import io
import json

import numpy as np
import pytest
import webdataset as wds
from PIL import Image
from sklearn.datasets import load_sample_images

from data_pipelines.latents.format import LatentManifest
from data_pipelines.latents.precompute import StaleLatentsError
from data_pipelines.loading.datamodules import LatentShardDataModule
from data_pipelines.raw.sources.base import SourceItem
from data_pipelines.raw.writer import write_raw_shards
from tests.conftest import compose_config, tiny_train_overrides
from trainer.cli.precompute import run_precompute
from trainer.cli.train import run_train

pytestmark = pytest.mark.slow

# (height, width) crops of real photos: tall, square and wide ones
SIZES = [(60, 30), (48, 40), (40, 40), (30, 52), (33, 70), (64, 36), (36, 36), (28, 56)]


def varied_aspect_source(count: int):
    photos = load_sample_images().images  # two real photos, 427x640
    for i in range(count):
        height, width = SIZES[i % len(SIZES)]
        photo = photos[i % len(photos)]
        top, left = (7 * i) % (photo.shape[0] - height), (11 * i) % (photo.shape[1] - width)
        buffer = io.BytesIO()
        Image.fromarray(photo[top : top + height, left : left + width]).save(buffer, format="PNG")
        yield SourceItem(f"photo[{i}]", buffer.getvalue(), f"a photo number {i % 5}", {"index": i})


@pytest.fixture(scope="module")
def bucketed(pretrained_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("buckets")
    write_raw_shards(varied_aspect_source(64), root / "raw", samples_per_shard=16)
    overrides = [f"shards={root / 'raw'}", f"pretrained={pretrained_dir}", "batch_size=8", "buckets=tiny"]
    run_precompute(compose_config("precompute", [*overrides, f"out_dir={root / 'latents'}"]))
    return root, overrides


def test_precompute_encodes_each_image_at_its_bucket_size(bucketed):
    root, _ = bucketed
    manifest = LatentManifest.load(root / "latents")
    assert manifest.bucket_sizes == [[40, 24], [32, 32], [24, 40]]
    assert manifest.bucket_latent_shapes == [[4, 10, 6], [4, 8, 8], [4, 6, 10]]
    assert manifest.transforms["buckets"] == manifest.bucket_sizes
    assert manifest.shards[0].cache_key["transforms"]["name"] == "bucket_resize_crop"
    urls = manifest.shard_paths(root / "latents")
    seen = {}
    for sample in wds.DataPipeline(wds.SimpleShardList(urls), wds.tarfile_to_samples()):
        meta = json.loads(sample["json"])
        latent = np.load(io.BytesIO(sample["latent.npy"]))
        height, width = meta["original_size"]
        assert meta["target_size"] == manifest.bucket_sizes[meta["bucket"]]
        assert list(latent.shape) == manifest.bucket_latent_shapes[meta["bucket"]]
        seen[(height, width)] = meta["bucket"]
    assert seen[(60, 30)] == 0 and seen[(40, 40)] == 1 and seen[(33, 70)] == 2  # tall, square, wide


def test_loader_batches_hold_one_bucket_each(bucketed):
    root, _ = bucketed
    datamodule = LatentShardDataModule(str(root / "latents"), batch_size=4, num_workers=0, shuffle_buffer=16)
    shapes = []
    for batch in datamodule.train_dataloader():
        latents = batch["latents"]
        assert latents.shape[0] == 4 and latents.dtype.is_floating_point
        shapes.append(tuple(latents.shape[1:]))
    assert len(shapes) == 16 and len(set(shapes)) == 3  # all three buckets, one per batch


def test_training_on_bucketed_latents_through_lf_train(bucketed, tmp_path):
    root, _ = bucketed
    overrides = tiny_train_overrides(root / "latents", tmp_path / "run", steps=4)
    metrics = run_train(compose_config("train", [*overrides, "data.batch_size=4"]))
    assert metrics["global_step"] == 4 and np.isfinite(metrics["train/loss"])


def test_another_bucket_set_makes_the_cache_stale(bucketed):
    root, overrides = bucketed
    out = f"out_dir={root / 'latents'}"
    with pytest.raises(StaleLatentsError, match=r"transform buckets .* changed"):
        run_precompute(compose_config("precompute", [*overrides, out, "buckets.step=4"]))
    with pytest.raises(StaleLatentsError, match=r"transform name \('bucket_resize_crop' -> 'resize_crop'\)"):
        run_precompute(compose_config("precompute", [o for o in overrides if o != "buckets=tiny"] + [out]))
