"""``lf-eval``, ``lf-dedup`` and the image-metrics callback with every path in a bucket of a real S3
server (moto, started by the fixtures): the same scores, prompts, reference features and output bytes
as the same files on local disk. Tiny sizes throughout: the session fixtures' model, digits and CLIP."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from PIL import Image

from data_pipelines.raw.sources.base import SourceItem
from data_pipelines.raw.writer import write_raw_shards
from lf_common import object_store
from lf_common.object_cache import CACHE_DIR_VARIABLE
from tests.conftest import FirstDigits, compose_config
from tests.s3_server import upload_folder
from trainer.callbacks.image_metrics import ImageMetrics
from trainer.cli.dedup import REPORT_NAME, run_dedup
from trainer.cli.eval import GRID_NAME, RESULT_NAME, run_eval
from trainer.evaluation.inception import FIDInceptionV3, InceptionFeatures

pytestmark = pytest.mark.slow
SCORES = ("fid", "kid", "kid_std", "clip_score", "num_images", "num_reference")
EVAL_ENCODERS = {"vae_path": "vae", "text_encoder_path": "text_encoder", "tokenizer_path": "tokenizer"}


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """The default download cache, in this test's folder (nothing from another test is reused)."""
    monkeypatch.setenv(CACHE_DIR_VARIABLE, str(tmp_path / "object-cache"))
    return tmp_path / "object-cache"


def eval_overrides(model: str, encoders: str, shards: str, clip: str, out: str) -> list[str]:
    """Three images of the tiny model's checkpoint (2 steps), digits features, the reference not cached."""
    return [
        f"model_dir={model}",
        *(f"{key}={encoders}/{name}" for key, name in EVAL_ENCODERS.items()),
        f"prompt_shards={shards}",
        "max_prompts=3",
        "steps=2",
        "features=digits",
        f"reference={shards}",
        f"clip={clip}",
        "cache_dir=null",
        "kid_subsets=5",
        "accelerator=cpu",
        f"out_dir={out}",
    ]


def scored_overrides(images: str, reference: str, clip: str, out: str) -> list[str]:
    """Images made already (their prompts from their PNG parameters), a folder of real images."""
    return [
        f"images_dir={images}",
        "features=digits",
        f"reference={reference}",
        f"clip={clip}",
        "cache_dir=null",
        "kid_subsets=5",
        "accelerator=cpu",
        f"out_dir={out}",
    ]


def test_lf_eval_with_every_path_in_the_bucket_scores_as_from_local_disk(
    s3_bucket, cache, base_model, pretrained_dir, raw_shards, tiny_clip_dir, tmp_path
):
    checkpoint = base_model.parent / "run" / "checkpoints" / "last.ckpt"
    object_store.upload(checkpoint, f"{s3_bucket}/run/last.ckpt")
    object_store.upload_folder(pretrained_dir, f"{s3_bucket}/models/tiny")
    object_store.upload_folder(tiny_clip_dir, f"{s3_bucket}/models/clip")
    upload_folder(raw_shards, f"{s3_bucket}/raw", "*.tar")

    local = run_eval(
        compose_config(
            "eval",
            eval_overrides(
                str(checkpoint), str(pretrained_dir), str(raw_shards), str(tiny_clip_dir), str(tmp_path / "local")
            ),
        )
    )
    downloads = tmp_path / "downloads"
    overrides = eval_overrides(
        f"{s3_bucket}/run/last.ckpt",
        f"{s3_bucket}/models/tiny",
        f"{s3_bucket}/raw/",
        f"{s3_bucket}/models/clip",
        f"{s3_bucket}/eval",
    )
    remote = run_eval(compose_config("eval", [*overrides, f"download_cache_dir={downloads}"]))

    assert {k: remote[k] for k in SCORES} == {k: local[k] for k in SCORES}
    assert remote["reference"]["content_sha256"] == local["reference"]["content_sha256"]
    assert remote["reference"]["description"].startswith(f"3 raw shards ({s3_bucket}/raw/shard-000000.tar")
    assert (remote["out_dir"], remote["grid"]) == (f"{s3_bucket}/eval", f"{s3_bucket}/eval/{GRID_NAME}")
    names = [f"images/{i:05d}-{i}.png" for i in range(3)]
    assert sorted(object_store.object_infos(f"{s3_bucket}/eval")) == sorted([*names, GRID_NAME, RESULT_NAME])
    for name in names:
        assert object_store.read_bytes(f"{s3_bucket}/eval/{name}") == (tmp_path / "local" / name).read_bytes()
    record = json.loads(object_store.read_bytes(f"{s3_bucket}/eval/{RESULT_NAME}"))
    assert record["fid"] == local["fid"] and record["model"] == f"{s3_bucket}/run/last.ckpt"
    assert any(downloads.iterdir()) and not cache.exists(), "the inputs went to download_cache_dir"

    # images made already, by URL, against a folder of real images in the bucket (prompts from the PNGs)
    reference = tmp_path / "real"
    reference.mkdir()
    for item in FirstDigits(6):
        Image.open(io.BytesIO(item.image_bytes)).save(reference / f"{item.origin.replace('/', '-')}.png")
    object_store.upload_folder(reference, f"{s3_bucket}/real")
    local = run_eval(
        compose_config(
            "eval",
            scored_overrides(
                str(tmp_path / "local" / "images"), str(reference), str(tiny_clip_dir), str(tmp_path / "scored")
            ),
        )
    )
    remote = run_eval(
        compose_config(
            "eval",
            scored_overrides(
                f"{s3_bucket}/eval/images", f"{s3_bucket}/real", f"{s3_bucket}/models/clip", f"{s3_bucket}/scored"
            ),
        )
    )
    assert {k: remote[k] for k in SCORES} == {k: local[k] for k in SCORES} and remote["num_reference"] == 6
    assert remote["reference"]["content_sha256"] == local["reference"]["content_sha256"]
    assert remote["reference"]["description"].startswith(f"{s3_bucket}/real (6 images)")
    assert json.loads(object_store.read_bytes(f"{s3_bucket}/scored/{RESULT_NAME}"))["kid"] == local["kid"]


def metrics_callback(prompts: dict[str, str], reference: str, features: tuple[str, ...] = ()) -> ImageMetrics:
    """The ``callbacks=with_image_metrics`` callback as ``lf-train`` builds it (digits features unless given)."""
    overrides = [
        "callbacks=with_image_metrics",
        *(features or ["features@callbacks.image_metrics.features=digits"]),
        *(f"callbacks.image_metrics.{key}={value}" for key, value in prompts.items()),
        f"callbacks.image_metrics.reference={reference}",
        "callbacks.image_metrics.cache_dir=null",
    ]
    return instantiate(compose_config("train", ["data.train_dir=unused", *overrides]).callbacks.image_metrics)


def test_image_metrics_callback_reads_prompts_reference_and_weights_from_the_bucket(
    s3_bucket, cache, raw_shards, tmp_path
):
    upload_folder(raw_shards, f"{s3_bucket}/raw", "*.tar")
    prompt_file = tmp_path / "prompts.txt"
    prompt_file.write_text("a handwritten digit one\n\na handwritten digit seven\n")
    object_store.upload(prompt_file, f"{s3_bucket}/prompts.txt")

    local = metrics_callback({"prompt_file": str(prompt_file)}, str(raw_shards))
    remote = metrics_callback({"prompt_file": f"{s3_bucket}/prompts.txt"}, f"{s3_bucket}/raw/")
    assert remote.prompts == local.prompts == ["a handwritten digit one", "a handwritten digit seven"]
    real, from_bucket = local.evaluator.prepare((32, 32)), remote.evaluator.prepare((32, 32))
    assert from_bucket.key == real.key and torch.equal(from_bucket.features, real.features)
    shards = {"prompt_shards": f"{s3_bucket}/raw/", "max_prompts": "40"}
    remote = metrics_callback(shards, f"'{s3_bucket}/raw/shard-{{000000..000001}}.tar'")  # quoted for Hydra
    assert remote.prompts == metrics_callback({**shards, "prompt_shards": str(raw_shards)}, str(raw_shards)).prompts
    assert len(remote.prompts) == 40 and remote.evaluator.reference.description.startswith("2 raw shards (s3://")

    # FID's Inception weights by URL: a downloaded copy, loaded strictly (random weights of the file's layout)
    torch.manual_seed(0)
    weights = {k: v for k, v in FIDInceptionV3().state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save(weights, tmp_path / "pt_inception.pth")
    object_store.upload(tmp_path / "pt_inception.pth", f"{s3_bucket}/models/pt_inception.pth")
    features = (
        "features@callbacks.image_metrics.features=inception",
        f"callbacks.image_metrics.features.weights_path={s3_bucket}/models/pt_inception.pth",
    )
    remote = metrics_callback({"prompt_file": f"{s3_bucket}/prompts.txt"}, f"{s3_bucket}/raw/", features)
    assert remote.evaluator.features.fingerprint() == InceptionFeatures(tmp_path / "pt_inception.pth").fingerprint()
    assert any(cache.rglob("pt_inception.pth")), "downloaded into the default download cache"


def planted_digits() -> list[SourceItem]:
    """40 real digits, then an exact copy of digit 3 and a copy of digit 17 re-encoded as JPEG."""
    items = list(FirstDigits(40))
    jpeg = io.BytesIO()
    Image.open(io.BytesIO(items[17].image_bytes)).convert("RGB").save(jpeg, format="JPEG", quality=95)
    return [
        *items,
        SourceItem("copy-0", items[3].image_bytes, items[3].caption),
        SourceItem("copy-1", jpeg.getvalue(), items[17].caption),
    ]


def test_lf_dedup_from_and_to_the_bucket_writes_the_shards_of_a_local_run(s3_bucket, cache, tiny_clip_dir, tmp_path):
    write_raw_shards(planted_digits(), tmp_path / "raw", samples_per_shard=16)
    upload_folder(tmp_path / "raw", f"{s3_bucket}/raw", "*.tar")
    settings = ["samples_per_shard=20"]
    local = run_dedup(
        compose_config("dedup", [f"shards={tmp_path / 'raw'}", f"out_dir={tmp_path / 'dedup'}", *settings])
    )
    overrides = [f"shards={s3_bucket}/raw/", f"out_dir={s3_bucket}/dedup", "workers=2", *settings]
    remote = run_dedup(compose_config("dedup", overrides))

    assert (remote["dropped"], remote["by_reason"]) == (2, {"exact": 1, "near": 1})
    assert remote["groups"] == local["groups"] and remote["report"] == f"{s3_bucket}/dedup/{REPORT_NAME}"
    names = ["shard-000000.tar", "shard-000001.tar"]
    assert remote["shards"] == [f"{s3_bucket}/dedup/{name}" for name in names]
    assert sorted(object_store.object_infos(f"{s3_bucket}/dedup")) == [REPORT_NAME, *names]
    for name in names:
        assert object_store.read_bytes(f"{s3_bucket}/dedup/{name}") == (tmp_path / "dedup" / name).read_bytes()
    report = json.loads(object_store.read_bytes(f"{s3_bucket}/dedup/{REPORT_NAME}"))
    on_disk = json.loads((tmp_path / "dedup" / REPORT_NAME).read_text())
    assert report["settings"].pop("workers") == 2, "hashed in two processes, each streaming its shards"
    assert {**report, "shards": []} == {**on_disk, "shards": [], "settings": report["settings"]}
    assert report["settings"] == {k: v for k, v in on_disk["settings"].items() if k != "workers"}

    # a dry run: the report to a URL of its own; CLIP embeddings from a CLIP folder in the bucket (downloaded once),
    # thumbnails must match exactly, so the JPEG copy is found by its embedding (cosine 0.99997; distinct digits <0.99)
    object_store.upload_folder(tiny_clip_dir, f"{s3_bucket}/models/clip")
    search = ["+features@embedding=clip", "embedding_size=32", "min_cosine=0.999", "max_pixel_difference=0"]
    dry_run = [f"shards={tmp_path / 'raw'}", "out_dir=null", f"report={tmp_path / 'dups.json'}", *search]
    local = run_dedup(compose_config("dedup", [*dry_run, f"embedding.folder={tiny_clip_dir}"]))
    overrides = [f"shards={s3_bucket}/raw/", "out_dir=null", f"report={s3_bucket}/reports/dups.json", *search]
    remote = run_dedup(compose_config("dedup", [*overrides, f"embedding.folder={s3_bucket}/models/clip"]))
    assert (remote["by_reason"], remote["shards"]) == ({"exact": 1, "embedding": 1}, [])
    assert remote["groups"] == local["groups"] and remote["report"] == f"{s3_bucket}/reports/dups.json"
    report = json.loads(object_store.read_bytes(f"{s3_bucket}/reports/dups.json"))
    assert report == json.loads((tmp_path / "dups.json").read_text()) and report["settings"]["embedding"]
    assert REPORT_NAME not in object_store.object_infos(f"{s3_bucket}/raw"), "report= replaces the default"
    assert any(cache.rglob("config.json")), "the CLIP folder downloaded into the default download cache"
