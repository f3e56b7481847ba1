"""The digits path with every path in a bucket of a real S3 server (moto, started by the
fixtures): raw shards written to ``s3://`` -> ``lf-precompute`` to ``s3://`` with the encoders'
model folder in ``s3://`` too (``pretrained=s3://...``) -> ``lf-train`` from ``s3://`` with its
checkpoints in ``s3://`` -> ``lf-export`` to ``s3://`` (the encoders the manifest names by URL) ->
``lf-sample`` to ``s3://`` (also from the checkpoint with encoder folders, ``prompt_file`` and
``from_png`` by URL); ``lf-train model=pretrained`` from the export in ``s3://`` with ``model.lora_from`` a LoRA
file in ``s3://`` (only the parts it needs downloaded).

Training from the bucket is compared with training from the same latents on local disk: a run
stopped and resumed from the bucket ends bit-identical to an uninterrupted run from local disk
(weights, EMA, optimizer, data position).
"""

from __future__ import annotations

import logging
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch
import webdataset as wds
from diffusers import AutoencoderKL, UNet2DConditionModel
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import SingleDeviceStrategy
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import CLIPTextModel, CLIPTokenizer

from data_pipelines.latents.format import LatentManifest, decode_latent_sample, entry_path, load_entry
from data_pipelines.raw.writer import write_raw_shards
from lf_common import object_store
from lf_common.errors import DataError
from lf_common.object_cache import CACHE_DIR_VARIABLE, cached_copy, model_folder
from tests.conftest import FirstDigits, compose_config, tiny_train_overrides
from tests.integration.cli import run_cli, run_in_process
from tests.integration.test_resume import assert_same_training_state, final_state, train
from tests.s3_server import make_bucket, point_aws_at, server_down
from trainer.callbacks.validation_images import ValidationImages
from trainer.checkpoint.reading import load_checkpoint
from trainer.cli.export import run_export
from trainer.cli.precompute import run_precompute
from trainer.cli.sample import ENCODER_FOLDERS, run_sample
from trainer.cli.train import run_train
from trainer.dreambooth.class_images import class_image_path
from trainer.dreambooth.prepare import ClassImages, prepare_dreambooth
from trainer.interop.lora_formats import kohya_state_dict
from trainer.lora.adapters import AdapterWeights, LoraSettings, adapter_state_dict, add_lora
from trainer.sampling.sampler import SampleSettings

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def bucket(s3_server, tmp_path_factory):
    """A bucket for this module, with the AWS variables pointing at the server while it runs (and the
    download cache in a temporary folder)."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        point_aws_at(s3_server, monkeypatch)
        monkeypatch.setenv(CACHE_DIR_VARIABLE, str(tmp_path_factory.mktemp("object-cache")))
        yield make_bucket()


@pytest.fixture(scope="module")
def s3_pretrained(bucket, pretrained_dir):
    """The encoders' model folder (vae/, text_encoder/, tokenizer/) uploaded to ``s3://.../models/tiny``."""
    object_store.upload_folder(pretrained_dir, f"{bucket}/models/tiny")
    return f"{bucket}/models/tiny"


def precompute_overrides(bucket: str, pretrained: str, out: str = "latents") -> list[str]:
    return [
        f"shards={bucket}/raw/",
        f"out_dir={bucket}/{out}",
        f"pretrained={pretrained}",
        "resolution=32",
        "batch_size=48",
    ]


@pytest.fixture(scope="module")
def s3_latents(bucket, s3_pretrained):
    """The digits written as raw shards into ``s3://.../raw`` (lf-shards' writer), then precomputed into
    ``s3://.../latents`` with the encoders of ``s3://.../models/tiny``."""
    write_raw_shards(FirstDigits(96), f"{bucket}/raw", samples_per_shard=32)
    run_precompute(compose_config("precompute", precompute_overrides(bucket, s3_pretrained)))
    return f"{bucket}/latents"


def samples(url: str) -> dict[str, dict]:
    """The decoded samples of a latent shard (local or in the bucket), by key."""
    from data_pipelines.shards.corrupt_samples import SkipCounter
    from data_pipelines.shards.shard_reading import tar_samples

    pipeline = wds.DataPipeline(wds.SimpleShardList([url]), lambda s: tar_samples(s, handler=SkipCounter(0.0, 1)))
    return {raw["__key__"]: decode_latent_sample(raw) for raw in pipeline}


def test_precompute_to_the_bucket_writes_what_it_writes_on_local_disk(s3_latents, latent_dir, s3_pretrained):
    manifest = LatentManifest.load(s3_latents)
    local = LatentManifest.load(latent_dir)
    # encoders from the bucket: the manifest names their URLs, with the fingerprints of the local folder
    assert (manifest.vae.path, manifest.text_encoder.path, manifest.tokenizer_path) == (
        f"{s3_pretrained}/vae",
        f"{s3_pretrained}/text_encoder",
        f"{s3_pretrained}/tokenizer",
    )
    assert manifest.vae.fingerprint == local.vae.fingerprint
    assert manifest.text_encoder.fingerprint == local.text_encoder.fingerprint
    assert manifest.num_samples == 96 and [s.name for s in manifest.shards] == [s.name for s in local.shards]
    objects = {object_store.basename(url) for url in object_store.list_objects(s3_latents + "/")}
    names = [s.name for s in manifest.shards]
    assert objects == {
        *names,
        *(object_store.basename(entry_path(n)) for n in names),
        "manifest.json",
        "uncond.text.npy",
    }
    for name in names:
        remote, disk = samples(f"{s3_latents}/{name}"), samples(str(latent_dir / name))
        assert remote.keys() == disk.keys()
        for key, sample in remote.items():
            assert np.array_equal(sample.latent, disk[key].latent) and np.array_equal(sample.text, disk[key].text)
    assert manifest.shards[0].source.startswith("s3://") and manifest.shards[0].cache_key == {
        **local.shards[0].cache_key,
        "source_sha256": local.shards[0].source_sha256,
    }


def test_validation_images_load_the_encoders_the_manifest_names_by_url(s3_latents, pretrained_dir):
    trainer = SimpleNamespace(datamodule=SimpleNamespace(manifest=LatentManifest.load(s3_latents)))
    frozen = ValidationImages(["a handwritten digit one"])._load_frozen(trainer, torch.device("cpu"))
    local = AutoencoderKL.from_pretrained(pretrained_dir / "vae", local_files_only=True).state_dict()
    assert all(torch.equal(value, local[key]) for key, value in frozen["vae"].state_dict().items())


def test_a_rerun_reuses_recorded_uploads_and_encodes_an_unrecorded_one(s3_latents, bucket, s3_pretrained, caplog):
    # A crash after shard-000001.tar was uploaded and before it was recorded: no record, so not complete.
    fs, path = object_store.filesystem(entry_path(f"{s3_latents}/shard-000001.tar"))
    fs.rm_file(path)
    with caplog.at_level(logging.INFO, logger="data_pipelines.latents"):
        run_precompute(compose_config("precompute", precompute_overrides(bucket, s3_pretrained)))
    reused = sorted(r.args[0] for r in caplog.records if "complete and up to date, reused" in r.getMessage())
    assert reused == ["shard-000000.tar", "shard-000002.tar"]
    assert LatentManifest.load(s3_latents).num_samples == 96
    assert object_store.exists(entry_path(f"{s3_latents}/shard-000001.tar"))


def test_a_server_gone_mid_upload_then_back_gives_the_uninterrupted_result(
    s3_latents, s3_server, bucket, s3_pretrained, monkeypatch
):
    out = f"{bucket}/latents-interrupted"
    overrides = precompute_overrides(bucket, s3_pretrained, "latents-interrupted")
    real_upload, uploads = object_store.upload, []

    def upload_then_lose_the_server(local, url):
        uploads.append(url)
        if len(uploads) < 2:
            return real_upload(local, url)
        with server_down(s3_server):  # the store goes away as the second shard's upload starts
            return real_upload(local, url)

    monkeypatch.setattr(object_store, "upload", upload_then_lose_the_server)
    with pytest.raises(object_store.ObjectStoreError, match=r"shard-000001\.tar at endpoint .*Could not connect"):
        run_precompute(compose_config("precompute", overrides))
    assert not object_store.exists(f"{out}/shard-000001.tar") and not object_store.exists(f"{out}/manifest.json")
    assert load_entry(f"{out}/shard-000000.tar") is not None  # the shard before is complete and recorded

    monkeypatch.setattr(object_store, "upload", real_upload)
    run_precompute(compose_config("precompute", overrides))  # the same command, the server back
    assert LatentManifest.load(out) == LatentManifest.load(s3_latents)
    for name in ("shard-000000.tar", "shard-000001.tar", "shard-000002.tar", "uncond.text.npy"):
        assert object_store.read_bytes(f"{out}/{name}") == object_store.read_bytes(f"{s3_latents}/{name}")


@pytest.mark.dist
def test_two_ranks_precompute_into_the_bucket_as_one_process_does(s3_latents, bucket, s3_pretrained, tmp_path):
    """Each rank uploads and records its own shards; rank 0 sees the other rank's (no stale listing) and
    writes the manifest."""
    torchrun = Path(sys.executable).parent / "torchrun"
    overrides = precompute_overrides(bucket, s3_pretrained, "latents-2ranks")
    argv = [str(torchrun), "--standalone", "--nproc_per_node=2", "-m", "trainer.cli.precompute", *overrides]
    result = subprocess.run([*argv, f"hydra.run.dir={tmp_path / 'hydra'}"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    out = f"{bucket}/latents-2ranks"
    assert LatentManifest.load(out) == LatentManifest.load(s3_latents)
    for name in ("shard-000000.tar", "shard-000001.tar", "shard-000002.tar"):
        assert object_store.read_bytes(f"{out}/{name}") == object_store.read_bytes(f"{s3_latents}/{name}")


def test_training_from_the_bucket_stopped_and_resumed_equals_local_uninterrupted(
    s3_latents, latent_dir, bucket, s3_pretrained, tmp_path, monkeypatch
):
    """Checkpoints in the bucket too: ``ckpt_path=last`` resumes from the newest remote one, exactly; then
    ``lf-export`` from the bucket to the bucket (the encoders from the URLs the manifest names), ``lf-sample``
    from the bucket to the bucket, and ``lf-train model=pretrained`` from the export in the bucket with a LoRA
    file in the bucket (``model.lora_from``): it starts from their weights and trains the adapters."""
    assert train(latent_dir, tmp_path / "local", 5)["global_step"] == 5
    checkpoints = f"{bucket}/run/checkpoints"
    remote = f"callbacks.model_checkpoint.dirpath={checkpoints}"
    train(s3_latents, tmp_path / "s3", 3, remote)
    result = train(s3_latents, tmp_path / "s3", 5, remote, "ckpt_path=last")
    assert result["checkpoint"] == f"{checkpoints}/last.ckpt"
    cache = tmp_path / "cache"
    state = load_checkpoint(cached_copy(f"{checkpoints}/last.ckpt", cache))
    assert_same_training_state(state, final_state(tmp_path / "local"))
    # retention in the bucket (the newest 3 and last); no checkpoint left on local disk
    names = {object_store.basename(url) for url in object_store.list_objects(checkpoints + "/")}
    assert names == {"step-0000003.ckpt", "step-0000004.ckpt", "step-0000005.ckpt", "last.ckpt"}
    assert not list((tmp_path / "s3" / "checkpoint-staging").iterdir())
    assert not (tmp_path / "s3" / "checkpoints").exists()
    assert list((tmp_path / "s3" / "checkpoint-cache").iterdir()) == [], "the resumed copy is removed"

    export_dir = f"{bucket}/export/step-5"
    exported = run_export(
        compose_config("export", [f"ckpt_path={checkpoints}/last.ckpt", f"out_dir={export_dir}", f"cache_dir={cache}"])
    )
    assert exported["out_dir"] == export_dir and object_store.exists(f"{export_dir}/model_index.json")
    single = [f"ckpt_path={checkpoints}/last.ckpt", "format=single_file", f"out_dir={bucket}/export/model"]
    written = run_export(compose_config("export", [*single, f"cache_dir={cache}"]))["out_file"]
    assert written == f"{bucket}/export/model.safetensors" and object_store.exists(written)

    overrides = [
        f"model_dir={export_dir}",
        f"out_dir={bucket}/images",
        f"cache_dir={cache}",
        "steps=2",
        "num_images_per_prompt=2",
        'prompts=["a handwritten digit one"]',
    ]
    sampled = run_sample(compose_config("sample", overrides))
    paths = sampled["paths"]
    assert paths == [f"{bucket}/images/00000-0.png", f"{bucket}/images/00001-1.png"]
    assert all(object_store.exists(url) for url in [*paths, f"{bucket}/images/grid.png"])
    downloads = []  # the export is in the cache: sampling again downloads nothing
    real_download = object_store.download
    monkeypatch.setattr(object_store, "download", lambda url, local: downloads.append(url) or real_download(url, local))
    again = run_sample(compose_config("sample", [*overrides, f"from_png={paths[0]}", f"out_dir={tmp_path / 'again'}"]))
    assert downloads == []
    assert np.array_equal(np.asarray(again["images"][0]), np.asarray(sampled["images"][0]))  # from_png by URL

    # from the checkpoint, with the encoder folders and the prompts by URL
    object_store.write_bytes(f"{bucket}/prompts.txt", b"a handwritten digit one\n")
    encoders = [f"{key}={s3_pretrained}/{key.removesuffix('_path')}" for key in ENCODER_FOLDERS]
    from_checkpoint = [f"model_dir={checkpoints}/last.ckpt", *encoders, f"prompt_file={bucket}/prompts.txt"]
    made = run_sample(compose_config("sample", [*overrides, *from_checkpoint, f"out_dir={tmp_path / 'ckpt'}"]))
    assert made["prompts"] == ["a handwritten digit one"] * 2
    assert np.array_equal(np.asarray(made["images"][1]), np.asarray(sampled["images"][1]))

    # lf-train model=pretrained model.pretrained=s3://... model.lora_from=s3://...: trains the adapters of a LoRA
    # file in the bucket on the UNet of the export in the bucket, downloading only unet/, scheduler/ and the file
    exported = cached_copy(export_dir, cache)
    lora_url, adapters = upload_random_lora(exported / "unet", f"{bucket}/lora.safetensors", tmp_path / "lora")
    run_cache, run = tmp_path / "train-cache", tmp_path / "from-pretrained"
    monkeypatch.setenv(CACHE_DIR_VARIABLE, str(run_cache))
    overrides = [
        *tiny_train_overrides(latent_dir, run, steps=2),
        "model=pretrained",
        f"model.pretrained={export_dir}",
        f"model.lora_from={lora_url}",
        "+callbacks.start_weights._target_=tests.integration.test_object_storage.StartWeights",
        f"+callbacks.start_weights.path={run / 'start.safetensors'}",
    ]
    assert run_train(compose_config("train", overrides))["global_step"] == 2
    assert {p.name for p in run_cache.glob("*/*/*")} == {"unet", "scheduler", "lora.safetensors"}
    start = load_file(run / "start.safetensors")  # the UNet as training started: the export's, with the file's adapters
    base = load_file(exported / "unet" / "diffusion_pytorch_model.safetensors")
    assert {k.replace(".base_layer", ""): v for k, v in start.items() if ".lora_" not in k}.keys() == base.keys()
    assert all(torch.equal(v, base[k.replace(".base_layer", "")]) for k, v in start.items() if ".lora_" not in k)
    started = {k.replace(".default", ""): v for k, v in start.items() if ".lora_" in k}
    assert started.keys() == adapters.keys() and all(torch.equal(v, adapters[k]) for k, v in started.items())
    trained = {k.removeprefix("unet."): v for k, v in final_state(run)["current_model_state"].items()}
    assert trained.keys() == start.keys()
    assert all(torch.equal(trained[k], v) == (".lora_" not in k) for k, v in start.items()), "only adapters train"


class StartWeights(Callback):
    """Saves the UNet's weights (peft's names with adapters) to ``path`` (safetensors) as training starts."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        save_file({k: v.detach().clone() for k, v in pl_module.unet.state_dict().items()}, self.path)


def upload_random_lora(unet_dir: Path, url: str, scratch: Path) -> tuple[str, dict[str, torch.Tensor]]:
    """A kohya LoRA file of random adapters (rank 2 on ``to_q``/``to_v``) for the UNet in ``unet_dir``,
    uploaded to ``url``; returns ``url`` and the adapters' weights (peft's names, ``...to_q.lora_A.weight``)."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_pretrained(unet_dir, local_files_only=True)
    settings = LoraSettings(rank=2, alpha=2.0, target_modules=["to_q", "to_v"])
    add_lora(unet, settings)
    with torch.no_grad():
        for parameter in unet.parameters():
            if parameter.requires_grad:  # the adapters (peft starts lora_B at zero: no effect)
                parameter.normal_(0.0, 0.1)
    adapters = adapter_state_dict(unet)
    scratch.mkdir(parents=True, exist_ok=True)
    save_file(kohya_state_dict(AdapterWeights(adapters, settings)), scratch / "lora.safetensors")
    object_store.upload(scratch / "lora.safetensors", url)
    return url, adapters


def test_commands_take_the_endpoint_option_and_stream_with_loader_workers_and_validation(
    s3_latents, bucket, tmp_path, monkeypatch
):
    endpoint = object_store.endpoint_url()
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3")  # the commands get the endpoint from their option alone
    shards = f"shards='{bucket}/raw/shard-{{000000..000002}}.tar'"  # quoted: Hydra reads braces otherwise
    validate = run_cli("lf-validate", shards, f"s3_endpoint_url={endpoint}", cwd=tmp_path)
    assert validate.returncode == 0, validate.stderr[-3000:]
    assert "validate: " in validate.stdout and "s3://" in validate.stdout
    overrides = [
        *tiny_train_overrides(s3_latents, tmp_path / "out", steps=2),
        "data.num_workers=2",
        f"data.val_dir={s3_latents}",
        "trainer.val_check_interval=2",
    ]
    result = run_cli("lf-train", *overrides, f"s3_endpoint_url={endpoint}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "out" / "checkpoints" / "last.ckpt").is_file()
    (metrics,) = (tmp_path / "out" / "csv").glob("version_*/metrics.csv")
    assert "val/loss" in metrics.read_text().splitlines()[0]  # validation streamed from the bucket too


def test_a_missing_bucket_is_one_plain_line(s3_latents, tmp_path):
    result = run_in_process("lf-train", *tiny_train_overrides("s3://no-such-bucket/latents", tmp_path), cwd=tmp_path)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert "Traceback" not in result.stderr
    assert any(
        "s3://no-such-bucket/latents/manifest.json" in line and "bucket does not exist" in line for line in lines
    ), result.stderr


def test_a_missing_model_folder_is_one_plain_line(s3_latents, bucket, tmp_path):
    overrides = precompute_overrides(bucket, f"{bucket}/models/none/", "latents-none")  # a trailing / is fine
    result = run_in_process("lf-precompute", *overrides, cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert f"{bucket}/models/none/vae at endpoint http://127.0.0.1:" in result.stderr
    assert "nothing under this key; expected a model folder" in result.stderr
    missing_bucket = r"s3://no-such-bucket/sd15/vae at endpoint \S+: the bucket does not exist; expected a model folder"
    with pytest.raises(object_store.ObjectStoreError, match=missing_bucket):
        model_folder("s3://no-such-bucket/sd15/vae")


def test_dreambooth_reads_its_photos_class_images_and_encoders_from_the_bucket(
    bucket, s3_pretrained, cat_photos, tmp_path
):
    object_store.upload_folder(cat_photos, f"{bucket}/photos")
    made = tmp_path / "class-images"
    made.mkdir()
    for i in range(2):
        Image.new("RGB", (48, 48), (90 * i, 60, 30)).save(class_image_path(made, i))
        class_image_path(made, i).with_suffix(".txt").write_text("a photo of a cat")
    object_store.upload_folder(made, f"{bucket}/class-images")
    classes = ClassImages("a photo of a cat", f"{bucket}/class-images", 2, SampleSettings(height=32, width=32))
    cpu = SingleDeviceStrategy(torch.device("cpu"))
    args = (cpu, f"{bucket}/photos", "a photo of sks cat", tmp_path / "dreambooth", s3_pretrained, 32)
    latents = prepare_dreambooth(*args, classes)
    instance, made_classes = LatentManifest.load(latents.instance), LatentManifest.load(latents.classes)
    assert (instance.num_samples, made_classes.num_samples) == (4, 2)
    assert instance.vae.path == f"{s3_pretrained}/vae"
    with pytest.raises(DataError, match=r"class-images lacks 1 of 3 class images \(first: class-00002\.png\)"):
        prepare_dreambooth(*args, replace(classes, count=3))  # a class_dir URL is read, never generated into


def test_the_text_encoder_recipes_load_their_encoders_from_the_bucket(s3_pretrained, pretrained_dir):
    """``experiment=dreambooth_text_encoder model.pretrained=s3://...``: the trained encoder and its tokenizer
    come from the bucket's copy, the same weights and vocabulary as the local folder."""
    model = compose_config("train", ["experiment=dreambooth_text_encoder", f"model.pretrained={s3_pretrained}"]).model
    encoder, tokenizer = instantiate(model.text_encoder), instantiate(model.tokenizer)
    local = CLIPTextModel.from_pretrained(pretrained_dir / "text_encoder", local_files_only=True)
    ours, theirs = encoder.state_dict(), local.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert tokenizer.get_vocab() == CLIPTokenizer.from_pretrained(pretrained_dir / "tokenizer").get_vocab()
    with pytest.raises(InstantiationException, match=r"models/none/text_encoder at endpoint .*expected a model folder"):
        instantiate(model.text_encoder, path=s3_pretrained.replace("models/tiny", "models/none"))
