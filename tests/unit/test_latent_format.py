import json

import numpy as np
import pytest
import webdataset as wds

from data_pipelines.latents.format import (
    LATENT_KEY,
    MANIFEST_NAME,
    EncoderInfo,
    LatentManifest,
    LatentSample,
    ShardEntry,
    decode_latent_sample,
    encode_latent_sample,
    load_uncond_embedding,
    save_uncond_embedding,
)
from data_pipelines.shards.tar_writer import open_tar_writer
from lf_common.errors import CorruptSampleError, DataError


def make_manifest(**changes):
    info = EncoderInfo(path="/m/vae", class_name="AutoencoderKL", fingerprint="ab" * 32, extra={"scaling_factor": 0.5})
    text = EncoderInfo(path="/m/text_encoder", class_name="CLIPTextModel", fingerprint="cd" * 32)
    manifest = LatentManifest(
        resolution=32,
        latent_shape=[4, 8, 8],
        text_shape=[8, 32],
        vae=info,
        text_encoder=text,
        tokenizer_path="/m/tokenizer",
        transforms={"name": "resize_crop"},
        shards=[ShardEntry("a.tar", 3, "/raw/a.tar", "00" * 32)],
    )
    for key, value in changes.items():
        setattr(manifest, key, value)
    return manifest


def test_sample_round_trip_through_a_tar(tmp_path):
    latent = np.random.default_rng(0).standard_normal((4, 8, 8)).astype(np.float32)
    text = np.random.default_rng(1).standard_normal((8, 32)).astype(np.float32)
    with open_tar_writer(tmp_path / "s.tar") as writer:
        writer.write(encode_latent_sample(LatentSample("k1", latent, text, "a caption", {"label": 3})))
    raw = next(iter(wds.DataPipeline(wds.SimpleShardList([str(tmp_path / "s.tar")]), wds.tarfile_to_samples())))
    assert set(raw) >= {"latent.npy", "text.npy", "txt", "json"}
    sample = decode_latent_sample(raw, (4, 8, 8), (8, 32))
    assert sample.latent.dtype == np.float16 and sample.text.dtype == np.float16
    np.testing.assert_allclose(sample.latent, latent, atol=2e-3)
    np.testing.assert_allclose(sample.text, text, atol=2e-3)
    assert (sample.key, sample.caption, sample.meta) == ("k1", "a caption", {"label": 3})


def test_wrong_shape_or_missing_member_names_shard_and_key():
    good = encode_latent_sample(LatentSample("k", np.zeros((4, 8, 8)), np.zeros((8, 32)), "c"))
    good["__url__"] = "shard-7.tar"
    with pytest.raises(
        CorruptSampleError,
        match=r"shard-7\.tar: sample k: member 'latent\.npy' is float16 \(4, 8, 8\), expected float16 \(4, 16, 16\)",
    ):
        decode_latent_sample(good, (4, 16, 16), (8, 32))
    del good[LATENT_KEY]
    with pytest.raises(CorruptSampleError, match=r"shard-7\.tar: sample k: member 'latent\.npy' is missing"):
        decode_latent_sample(good)
    good[LATENT_KEY] = b"garbage"
    with pytest.raises(CorruptSampleError, match=r"is not a \.npy array"):
        decode_latent_sample(good)


def test_manifest_round_trip_and_errors(tmp_path):
    manifest = make_manifest()
    manifest.save(tmp_path)
    loaded = LatentManifest.load(tmp_path)
    assert loaded == manifest and loaded.num_samples == 3
    data = json.loads((tmp_path / MANIFEST_NAME).read_text())
    data["version"] = 99
    (tmp_path / MANIFEST_NAME).write_text(json.dumps(data))
    with pytest.raises(DataError, match=r"manifest\.json: key 'version' is 99, expected 1"):
        LatentManifest.load(tmp_path)
    del data["vae"]
    data["version"] = 1
    (tmp_path / MANIFEST_NAME).write_text(json.dumps(data))
    with pytest.raises(DataError, match=r"manifest\.json: key 'vae' is missing"):
        LatentManifest.load(tmp_path)
    with pytest.raises(DataError, match=r"manifest is missing"):
        LatentManifest.load(tmp_path / "elsewhere")


def test_listed_shards_must_exist(tmp_path):
    with pytest.raises(DataError, match=r"lists shards that are missing"):
        make_manifest().shard_paths(tmp_path)


def test_uncond_embedding_shape_is_checked(tmp_path):
    manifest = make_manifest()
    save_uncond_embedding(tmp_path, np.ones((8, 32)))
    assert load_uncond_embedding(tmp_path, manifest).shape == (8, 32)
    save_uncond_embedding(tmp_path, np.ones((77, 32)))
    with pytest.raises(DataError, match=r"shape \[77, 32\], expected text_shape \[8, 32\]"):
        load_uncond_embedding(tmp_path, manifest)


def test_shards_from_other_encoders_are_refused(tmp_path):
    manifest = make_manifest()
    key = {"source_sha256": "00", "vae": "ab" * 32, "text_encoder": "cd" * 32, "tokenizer": "t", "transforms": {}}
    manifest.shards[0].cache_key = {**key, "transforms": {"name": "resize_crop"}}
    manifest.check_consistent(tmp_path)
    manifest.shards[0].cache_key = {**key, "vae": "ff" * 32, "transforms": {"name": "resize_crop"}}
    with pytest.raises(DataError, match=r"a\.tar: made with other encoders or transforms"):
        manifest.check_consistent(tmp_path)


def test_cache_key_differences_in_words():
    from data_pipelines.latents.format import CacheKey

    old = CacheKey("s1", "v1", "t1", "k1", {"resolution": 32, "crop": "center"})
    new = CacheKey("s2", "v1", "t1", "k1", {"resolution": 64, "crop": "center"})
    assert new.differences(old) == ["the input shard's content", "transform resolution (32 -> 64)"]
    assert new.differences(new) == []
