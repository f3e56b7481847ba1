"""s3:// paths against a real S3 server (moto, started by the fixtures): listing, streaming,
validation, the latent-shard manifest and records."""

from __future__ import annotations

import os
import re
import tarfile
from collections.abc import Callable

import numpy as np
import pytest
from hydra.utils import instantiate

from data_pipelines.latents.format import (
    LatentManifest,
    ShardEntry,
    load_entry,
    load_uncond_embedding,
    save_entry,
    save_uncond_embedding,
)
from data_pipelines.raw.validate import validate_shards
from data_pipelines.shards.listing import resolve_shards
from data_pipelines.shards.shard_reading import open_shard
from lf_common import object_store
from lf_common.errors import DataError
from lf_common.object_cache import cached_copy
from lf_common.staged_output import staged_output
from tests.conftest import compose_config
from tests.s3_server import upload_folder
from tests.unit.test_latent_format import make_manifest
from trainer.cli.validate import run_validate


def test_prefix_brace_and_glob_list_the_uploaded_shards(s3_bucket, raw_shards):
    urls = upload_folder(raw_shards, f"{s3_bucket}/raw", "*.tar")
    assert len(urls) == 3
    assert resolve_shards(f"{s3_bucket}/raw/") == urls
    assert resolve_shards(f"{s3_bucket}/raw/*.tar") == urls
    assert resolve_shards(f"{s3_bucket}/raw/shard-{{000000..000001}}.tar") == urls[:2]


def test_missing_bucket_prefix_and_shard_are_one_line_errors(s3_bucket, raw_shards):
    upload_folder(raw_shards, f"{s3_bucket}/raw", "*.tar")
    with pytest.raises(DataError) as missing_bucket:
        resolve_shards("s3://no-such-bucket/raw/")
    message = str(missing_bucket.value)
    assert message.startswith("s3://no-such-bucket/raw/ at endpoint http://127.0.0.1:")
    assert message.endswith(": the bucket does not exist; expected an existing bucket and prefix")
    assert "\n" not in message
    with pytest.raises(DataError, match=r"/other/ at endpoint .*: nothing under this key; expected an existing bucket"):
        resolve_shards(f"{s3_bucket}/other/")
    with pytest.raises(DataError, match=r"raw/shard-000003\.tar: shard path does not exist \(5 of 8 named"):
        resolve_shards(f"{s3_bucket}/raw/shard-{{000000..000007}}.tar")


def test_a_shard_is_streamed_in_ranged_reads(s3_bucket, raw_shards):
    (url, *_) = upload_folder(raw_shards, f"{s3_bucket}/raw", "*.tar")
    local = sorted(raw_shards.glob("*.tar"))[0]
    with open_shard(url) as stream:
        assert stream._file.blocksize == 8 << 20  # fetched a block at a time, never as a whole download
        with tarfile.open(fileobj=stream, mode="r|*") as tar:
            names = [member.name for member in tar]
    with tarfile.open(local) as tar:
        assert names == tar.getnames()


def test_validate_reads_shards_from_the_bucket(s3_bucket, raw_shards, tmp_path):
    urls = upload_folder(raw_shards, f"{s3_bucket}/raw", "*.tar")
    reports = validate_shards(urls)
    assert [r.samples for r in reports] == [32, 32, 32] and all(r.ok for r in reports)
    cut = tmp_path / "cut.tar"
    data = sorted(raw_shards.glob("*.tar"))[0].read_bytes()
    cut.write_bytes(data[: len(data) // 2 + 100])  # cut inside a member
    (broken,) = validate_shards(upload_folder(tmp_path, f"{s3_bucket}/broken", "*.tar"))
    assert broken.truncated is not None and not broken.ok


def test_manifest_records_and_uncond_round_trip_in_the_bucket(s3_bucket):
    folder = f"{s3_bucket}/latents"
    manifest = make_manifest()
    shard = object_store.join(folder, manifest.shards[0].name)
    entry = ShardEntry(manifest.shards[0].name, 3, "raw.tar", "abc")
    save_entry(shard, entry)
    assert load_entry(shard) is None  # recorded, but no shard object: not complete
    object_store.write_bytes(shard, b"tar bytes")
    assert load_entry(shard) == entry
    assert manifest.save(folder) == f"{folder}/manifest.json"
    assert LatentManifest.load(folder) == manifest
    assert manifest.shard_paths(folder) == [shard]
    uncond = np.ones(manifest.text_shape, dtype=np.float16)
    save_uncond_embedding(folder, uncond)
    assert np.array_equal(load_uncond_embedding(folder, manifest), uncond)
    with pytest.raises(
        DataError,
        match=r"/nothing/manifest\.json at endpoint .*: nothing under this key; expected an existing object \(the",
    ):
        LatentManifest.load(f"{s3_bucket}/nothing")


def test_refused_credentials_are_one_line_naming_the_variables(s3_bucket, raw_shards):
    from moto.core.authorization import enable_iam_authentication

    upload_folder(raw_shards, f"{s3_bucket}/raw", "*.tar")
    with enable_iam_authentication(), pytest.raises(DataError) as refused:  # the server checks keys: ours are unknown
        resolve_shards(f"{s3_bucket}/raw/")
    message = str(refused.value)
    assert message.startswith(f"{s3_bucket}/raw/ at endpoint http://127.0.0.1:") and "\n" not in message
    assert ": access refused (" in message
    assert message.endswith(
        "expected credentials the store accepts: check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or AWS_PROFILE"
    )


def test_raw_image_loader_counts_and_streams_shards_from_the_bucket(s3_bucket, raw_shards):
    from data_pipelines.loading.datamodules import ImageShardDataModule

    upload_folder(raw_shards, f"{s3_bucket}/raw", "*.tar")
    datamodule = ImageShardDataModule(
        f"{s3_bucket}/raw/", resolution=8, batch_size=32, num_workers=0, shuffle_buffer=0, resampled=False
    )
    assert datamodule.num_samples == 96
    batches = list(datamodule.train_dataloader())
    assert [b["pixels"].shape for b in batches] == [(32, 3, 8, 8)] * 3


def test_an_object_another_process_wrote_is_seen_after_a_listing(s3_bucket, s3_server):
    import fsspec

    object_store.write_bytes(f"{s3_bucket}/latents/a.tar", b"a")
    assert object_store.list_objects(f"{s3_bucket}/latents/") == [f"{s3_bucket}/latents/a.tar"]
    other = fsspec.filesystem("s3", skip_instance_cache=True, endpoint_url=s3_server)  # another rank's client
    other.pipe_file(f"{s3_bucket.removeprefix('s3://')}/latents/b.entry.json", b"{}")
    assert object_store.exists(f"{s3_bucket}/latents/b.entry.json")  # not answered from a stale listing
    assert object_store.is_file(f"{s3_bucket}/latents/b.entry.json")


def test_shards_are_written_to_the_bucket_whole_and_refuse_to_mix(s3_bucket, raw_shards, tmp_path):
    from data_pipelines.raw.writer import write_raw_shards
    from tests.conftest import FirstDigits

    summary = write_raw_shards(FirstDigits(96), f"{s3_bucket}/raw", samples_per_shard=32)
    urls = [f"{s3_bucket}/raw/shard-{index:06d}.tar" for index in range(3)]
    assert summary.shards == urls and summary.samples == 96
    assert object_store.list_objects(f"{s3_bucket}/raw/") == sorted([*urls, f"{s3_bucket}/raw/shards_summary.json"])
    for url, local in zip(
        urls, sorted(raw_shards.glob("*.tar")), strict=True
    ):  # byte-identical to lf-shards' local output
        assert object_store.read_bytes(url) == local.read_bytes()
    with pytest.raises(DataError, match=r"/raw: already holds 3 shard\(s\) such as shard-000000\.tar"):
        write_raw_shards(FirstDigits(8), f"{s3_bucket}/raw", samples_per_shard=4)
    write_raw_shards(FirstDigits(8), f"{s3_bucket}/raw", samples_per_shard=4, overwrite=True)
    assert len(resolve_shards(f"{s3_bucket}/raw/")) == 2


def test_a_cached_copy_is_downloaded_once_and_again_only_when_an_object_changed(s3_bucket, tmp_path, monkeypatch):
    folder = f"{s3_bucket}/export/step-5"
    object_store.write_bytes(f"{folder}/unet/weights.safetensors", b"one")
    object_store.write_bytes(f"{folder}/model_index.json", b"{}")
    downloads, real_download = [], object_store.download
    monkeypatch.setattr(object_store, "download", lambda url, local: downloads.append(url) or real_download(url, local))
    first = cached_copy(folder, tmp_path)
    assert (first / "unet" / "weights.safetensors").read_bytes() == b"one" and len(downloads) == 2
    assert cached_copy(folder, tmp_path) == first and len(downloads) == 2  # unchanged: nothing downloaded
    object_store.write_bytes(f"{folder}/unet/weights.safetensors", b"two")  # a new upload under the same key
    second = cached_copy(folder, tmp_path)
    assert (second / "unet" / "weights.safetensors").read_bytes() == b"two" and len(downloads) == 4
    assert not first.exists(), "one version of a URL is kept"
    single = cached_copy(f"{folder}/model_index.json", tmp_path)
    assert single.name == "model_index.json" and single.read_bytes() == b"{}"
    with pytest.raises(object_store.ObjectStoreError, match=r"step-6 at endpoint .*nothing under this key"):
        cached_copy(f"{s3_bucket}/export/step-6", tmp_path)


def test_a_missing_key_in_a_bucket_named_bucket_is_no_missing_bucket(s3_env, tmp_path):
    """A bucket named ``team-bucket-...`` (the word in its name, as in many): a missing key under it is "nothing
    under this key", and a missing bucket of such a name still "the bucket does not exist"."""
    bucket = f"team-bucket-{os.getpid()}"
    object_store.filesystem(f"s3://{bucket}")[0].mkdir(bucket)
    for missing in (
        lambda: object_store.read_bytes(f"s3://{bucket}/absent.json"),
        lambda: object_store.open_url(f"s3://{bucket}/absent.json"),
        lambda: cached_copy(f"s3://{bucket}/models/sd15", tmp_path),
    ):
        with pytest.raises(object_store.ObjectStoreError, match=r": nothing under this key; expected"):
            missing()
    with pytest.raises(object_store.ObjectStoreError, match=r": the bucket does not exist; expected"):
        cached_copy(f"s3://no-bucket-{os.getpid()}/models/sd15", tmp_path)


def test_a_folder_written_over_a_whole_bucket_is_refused_and_the_bucket_kept(s3_bucket):
    """``out_dir=s3://bucket`` (no prefix): replacing the folder would delete every object of the bucket and the
    bucket itself, and the upload then fail; refused before the block runs, and ``remove`` never deletes a bucket."""
    object_store.write_bytes(f"{s3_bucket}/other/keep.txt", b"keep")
    refused = pytest.raises(object_store.ObjectStoreError, match=r"a whole bucket.*expected a prefix in it")
    with refused, staged_output(f"{s3_bucket}/", last=("config.json",)):
        raise AssertionError("the block does not run")
    with pytest.raises(object_store.ObjectStoreError, match=r"a whole bucket is never deleted"):
        object_store.remove(s3_bucket)
    assert object_store.read_bytes(f"{s3_bucket}/other/keep.txt") == b"keep"
    with staged_output(f"{s3_bucket}/export", last=("config.json",)) as local:  # a prefix: replaced as before
        local.mkdir()
        (local / "config.json").write_text("{}")
    assert object_store.read_bytes(f"{s3_bucket}/export/config.json") == b"{}"
    assert object_store.read_bytes(f"{s3_bucket}/other/keep.txt") == b"keep"


def test_a_checkpoint_folder_in_a_missing_bucket_fails_before_training(s3_env):
    from trainer.callbacks.checkpoint import AtomicModelCheckpoint

    expected = r"the bucket does not exist; expected an existing bucket for callbacks.model_checkpoint.dirpath"
    with pytest.raises(object_store.ObjectStoreError, match=r"s3://no-such-bucket/run at endpoint .*" + expected):
        AtomicModelCheckpoint(dirpath="s3://no-such-bucket/run").setup(None, None, "fit")  # before the trainer is used


def _missing(option: str, raw_shards) -> tuple[str, Callable[[str], object], str]:
    """A path option of lf-eval, the image-metrics callback or lf-dedup given an object that is not there
    (``{bucket}``: the test's bucket): the URL, what reads it, and what its one-line error says was expected."""
    from tests.conftest import compose_config
    from trainer.cli.dedup import run_dedup
    from trainer.cli.eval import images_folder, run_eval
    from trainer.evaluation.clip_score import load_clip
    from trainer.evaluation.inception import InceptionFeatures
    from trainer.evaluation.prompts import read_prompt_set
    from trainer.evaluation.reference import open_reference

    def eval_to(url: str) -> object:
        return run_eval(compose_config("eval", ["images_dir=unused", "reference=unused", f"out_dir={url}"]))

    def dedup_to(url: str) -> object:
        return run_dedup(compose_config("dedup", [f"shards={raw_shards}", f"out_dir={url}"]))

    return {
        "prompt_file": ("{bucket}/prompts.txt", lambda url: read_prompt_set(prompt_file=url), "an existing object"),
        "reference": ("{bucket}/val", open_reference, "a reference set: a folder of images, or raw shards"),
        "weights_path": ("{bucket}/pt.pth", InceptionFeatures, r"the FID Inception weights file \(pt_inception-"),
        "clip": ("{bucket}/clip", load_clip, r"a model folder \(diffusers/transformers layout"),
        "images_dir": ("{bucket}/images", lambda url: images_folder(url, None), "a folder of images"),
        "eval out_dir": ("s3://no-such-bucket/eval", eval_to, "an existing bucket for out_dir"),
        "dedup out_dir": ("s3://no-such-bucket/dedup", dedup_to, "an existing bucket to write to"),
    }[option]


@pytest.mark.parametrize(
    "option", ["prompt_file", "reference", "weights_path", "clip", "images_dir", "eval out_dir", "dedup out_dir"]
)
def test_eval_and_dedup_paths_missing_from_the_bucket_are_one_line_errors(option, s3_bucket, raw_shards):
    url, read, expected = _missing(option, raw_shards)
    url = url.format(bucket=s3_bucket)
    with pytest.raises(object_store.ObjectStoreError) as error:
        read(url)
    message = str(error.value)
    assert message.startswith(f"{url} at endpoint http://127.0.0.1:") and "\n" not in message, message
    assert re.search(r": (nothing under this key|the bucket does not exist); expected " + expected, message), message


def test_a_prefix_named_without_its_slash_is_the_folder_it_looks_like(s3_bucket, raw_shards, tmp_path):
    """``shards=s3://bucket/raw`` (no trailing ``/``) is the prefix's shards, as ``s3://bucket/raw/`` and a local
    folder are, for every command that takes shards: ``lf-validate`` and ``lf-train-autoencoder``'s data here;
    a named shard that is missing is still refused, and a prefix holding no shards says so."""
    urls = upload_folder(raw_shards, f"{s3_bucket}/raw", "*.tar")
    object_store.write_bytes(f"{s3_bucket}/notes/readme.txt", b"no shards here")
    assert resolve_shards(f"{s3_bucket}/raw") == resolve_shards(f"{s3_bucket}/raw/") == urls
    assert resolve_shards([f"{s3_bucket}/raw", urls[0]]) == [*urls, urls[0]]
    result = run_validate(compose_config("validate", [f"shards={s3_bucket}/raw"]))
    assert result["ok"] and [r["samples"] for r in result["shards"]] == [32, 32, 32]
    data = compose_config("train_autoencoder", [f"data.shards={s3_bucket}/raw", "data.num_workers=0", "output_dir=o"])
    assert instantiate(data.data).urls == urls
    with pytest.raises(DataError, match=r"notes: folder holds no \.tar shards"):
        resolve_shards(f"{s3_bucket}/notes")
    with pytest.raises(DataError, match=r"raw/absent\.tar: shard path does not exist \(1 of 1 named"):
        resolve_shards(f"{s3_bucket}/raw/absent.tar")
