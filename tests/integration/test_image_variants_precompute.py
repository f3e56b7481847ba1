"""lf-precompute with cached image augmentation: the stored mirror images and crops are the encoded
mirrored and cropped images, their crops are in each sample's metadata, a rerun writes the same shards,
other variant settings make the shards stale, bucketed images are cropped inside their bucket's resize, and
``crop=random`` draws each canonical crop from ``augment_seed`` and the sample key."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from data_pipelines.latents.encoders import FrozenEncoders
from data_pipelines.latents.format import LatentManifest, decode_latent_sample
from data_pipelines.latents.precompute import StaleLatentsError
from data_pipelines.shards.tar_writer import open_tar_writer
from data_pipelines.transforms.images import image_to_pixels
from tests.conftest import compose_config
from trainer.cli.precompute import run_precompute

pytestmark = pytest.mark.slow

SIZES = [(48, 32)] * 4 + [(32, 48)] * 2  # (W, H): four wide images, two tall ones; none needs a resize at 32 px
VARIANTS = ["flip=true", "crops_per_image=2", "augment_seed=7"]


@pytest.fixture(scope="module")
def raw(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Image.Image]]:
    """A raw shard of six noise images (smooth enough for the tiny VAE), and the images by key."""
    folder = tmp_path_factory.mktemp("raw")
    rng = np.random.default_rng(0)
    images = {}
    with open_tar_writer(folder / "shard-000000.tar") as writer:
        for i, (width, height) in enumerate(SIZES):
            small = rng.integers(0, 255, (height // 4, width // 4, 3), dtype=np.uint8)
            image = Image.fromarray(small).resize((width, height), Image.Resampling.BILINEAR)
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            images[f"{i:04d}"] = image
            writer.write({"__key__": f"{i:04d}", "png": buffer.getvalue(), "txt": f"image {i}".encode()})
    return folder, images


def precompute(raw: Path, out: Path, pretrained: Path, *extra: str) -> LatentManifest:
    overrides = [f"shards={raw}", f"out_dir={out}", f"pretrained={pretrained}", "resolution=32", "batch_size=4"]
    run_precompute(compose_config("precompute", [*overrides, *extra]))
    return LatentManifest.load(out)


def samples(folder: Path, manifest: LatentManifest, stored: int) -> dict:
    urls = [str(folder / shard.name) for shard in manifest.shards]
    pipeline = wds.DataPipeline(wds.SimpleShardList(urls), wds.tarfile_to_samples())
    shapes = manifest.latent_shapes()
    return {
        raw["__key__"]: decode_latent_sample(
            raw, text_shape=manifest.text_shape, latent_shapes=shapes, latent_variants=stored
        )
        for raw in pipeline
    }


def test_stored_variants_are_the_encoded_mirrored_and_cropped_images(raw, pretrained_dir, tmp_path):
    folder, images = raw
    manifest = precompute(folder, tmp_path / "a", pretrained_dir, *VARIANTS)
    assert manifest.transforms["image_variants"] == {"flip": True, "crops_per_image": 2, "seed": 7}
    stored = samples(tmp_path / "a", manifest, 5)  # (1 + 2 crops) x 2 - the canonical one
    encoders = FrozenEncoders.from_pretrained(
        str(pretrained_dir / "vae"), str(pretrained_dir / "text_encoder"), str(pretrained_dir / "tokenizer"), "cpu"
    )
    for key, sample in stored.items():
        image = images[key]
        width, height = image.size
        variants = sample.meta["variants"]
        assert [v["flip"] for v in variants] == [True, False, True, False, True]
        assert variants[0]["crop_top_left"] == sample.meta["crop_top_left"]  # centred: its mirror is centred too
        expected = []
        for variant in variants:
            top, left = variant["crop_top_left"]  # in the image the model sees: the mirrored one when flipped
            assert 0 <= top <= height - 32 and 0 <= left <= width - 32
            seen = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if variant["flip"] else image
            expected.append(image_to_pixels(seen.crop((left, top, left + 32, top + 32))))
        with torch.inference_mode():
            encoded = encoders.encode_images(torch.stack(expected)).numpy().astype(np.float16)  # (5, C, h, w)
        # float16 storage of one encoding vs another batch's (equal here; the tolerance allows other conv kernels)
        np.testing.assert_allclose(sample.latent_variants.astype(np.float32), encoded, rtol=0, atol=1e-3)
        crops = {tuple(v["crop_top_left"]) for v in variants[1::2]}
        assert len(crops) > 1 or key >= "0004", "a wide image's crops differ"  # tall images: only top moves
    again = precompute(folder, tmp_path / "b", pretrained_dir, *VARIANTS)
    digest = [hashlib.sha256((tmp_path / d / "shard-000000.tar").read_bytes()).hexdigest() for d in ("a", "b")]
    assert again.transforms == manifest.transforms and digest[0] == digest[1], "a rerun writes the same shard"
    with pytest.raises(StaleLatentsError, match=r"transform image_variants \(.*'crops_per_image': 2.* -> .*3"):
        precompute(folder, tmp_path / "a", pretrained_dir, "flip=true", "crops_per_image=3", "augment_seed=7")


def test_random_canonical_crops_are_seeded_by_augment_seed_and_the_sample_key(raw, pretrained_dir, tmp_path):
    folder, _ = raw
    runs = {"a": 0, "b": 0, "c": 1}  # a and b: one seed twice (a rerun after a restart); c: another seed
    manifests = {run: precompute(folder, tmp_path / run, pretrained_dir, "crop=random", f"augment_seed={seed}")
                 for run, seed in runs.items()}  # fmt: skip
    stored = {run: samples(tmp_path / run, manifest, 0) for run, manifest in manifests.items()}
    corners = {run: {key: tuple(s.meta["crop_top_left"]) for key, s in found.items()} for run, found in stored.items()}
    assert len(set(corners["a"].values())) > 1, "the keys' crops differ: they are drawn, not centred"
    assert corners["a"] == corners["b"], "the same seed and key give the same crop"
    for key, sample in stored["a"].items():
        np.testing.assert_array_equal(sample.latent, stored["b"][key].latent)
    assert corners["c"] != corners["a"], "another augment_seed draws other crops"
    assert any(not np.array_equal(s.latent, stored["c"][key].latent) for key, s in stored["a"].items())
    assert manifests["c"].transforms["crop_seed"] == 1
    with pytest.raises(StaleLatentsError, match=r"transform crop_seed \(0 -> 1\)"):
        precompute(folder, tmp_path / "a", pretrained_dir, "crop=random", "augment_seed=1")


def test_bucketed_images_are_cropped_inside_their_buckets_resize(raw, pretrained_dir, tmp_path):
    folder, _ = raw
    manifest = precompute(folder, tmp_path / "latents", pretrained_dir, "buckets=tiny", "crops_per_image=3")
    stored = samples(tmp_path / "latents", manifest, 3)
    for sample in stored.values():
        target_h, target_w = sample.meta["target_size"]
        assert sample.latent_variants.shape[1:] == sample.latent.shape
        assert target_h != target_w, "a wide or tall image goes to a wide or tall bucket"
        height, width = sample.meta["original_size"]
        scale = max(target_h / height, target_w / width)
        resized_h, resized_w = max(target_h, round(height * scale)), max(target_w, round(width * scale))
        for variant in sample.meta["variants"]:
            top, left = variant["crop_top_left"]
            assert 0 <= top <= resized_h - target_h and 0 <= left <= resized_w - target_w and not variant["flip"]


def test_inpainting_with_variants_is_refused_in_one_line(raw, pretrained_dir, tmp_path):
    from lf_common.errors import ConfigError

    with pytest.raises(ConfigError, match=r"^inpainting=true with flip=true or crops_per_image>0: .*set flip=false"):
        precompute(raw[0], tmp_path, pretrained_dir, "inpainting=true", "flip=true")
