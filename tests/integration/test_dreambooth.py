"""DreamBooth on a real photo (scikit-image's cat) with a tiny base model trained in the test
(fixtures: tests/integration/conftest.py)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from PIL import Image

from data_pipelines.transforms.images import ResizeCrop
from lf_common import object_store
from lf_common.errors import DataError
from lf_common.object_cache import CACHE_DIR_VARIABLE
from tests.conftest import compose_config
from tests.integration.checkpoints import assert_resume_is_exact, assert_same_nested, consumed_batches
from tests.integration.dreambooth import (
    CLASS_PROMPT,
    INSTANCE_PROMPT,
    changed_parts,
    dreambooth_overrides,
    export_last,
    sample_latents,
)
from trainer.checkpoint.reading import load_checkpoint
from trainer.cli.train import run_train
from trainer.dreambooth.class_images import class_image_path, generate_class_images
from trainer.dreambooth.datamodule import DreamBoothDataModule
from trainer.dreambooth.prepare import instance_images
from trainer.sampling.sampler import Sampler, SampleSettings

pytestmark = pytest.mark.slow

SEEDS = list(range(8))


def fine_tune(base: Path, cat_photos: Path, tmp_path: Path, prior_loss_weight: float) -> Sampler:
    """200 steps of ``experiment=dreambooth`` at lr 2e-4 on the cat photos (8 class images, a cache
    shared between runs), exported and loaded."""
    run = tmp_path / f"run-prior{prior_loss_weight}"
    run_train(compose_config("train", [
        *dreambooth_overrides("dreambooth", base, cat_photos, tmp_path / "cache", run, steps=200),
        "optim.lr=2e-4", "data.num_class_images=8", "data.batch_size=4", "data.class_sample_steps=10",
        "data.class_guidance_scale=3.0", f"model.prior_loss_weight={prior_loss_weight}",
    ]))  # fmt: skip
    return Sampler.from_export(export_last(run, tmp_path / f"export-prior{prior_loss_weight}"), device="cpu")


def test_dreambooth_learns_the_subject_and_prior_preservation_keeps_the_class(demo, cat_photos, tmp_path):
    """The base is the shrunk demo's model of the digits (trained autoencoder, reads its prompt).
    Distances are in latent space (what the UNet makes, before the decoder), same seeds throughout."""
    base_dir = demo[0] / "export"
    base = Sampler.from_export(base_dir, device="cpu")
    crop = ResizeCrop(32, crop="center")
    pixels = torch.stack([crop(Image.open(p).convert("RGB"))[0] for p in instance_images(cat_photos)])
    with torch.no_grad():  # (4, 4, 8, 8): the subject's latents, as precompute made them
        subject = base.vae.encode(pixels).latent_dist.mode() * base.vae.config.scaling_factor

    def to_subject(generated: torch.Tensor) -> float:  # mean over samples of the nearest photo's MSE
        return float(torch.stack([((subject - g) ** 2).mean(dim=(1, 2, 3)).min() for g in generated]).mean())

    def drift(sampler: Sampler, prompt: str) -> float:  # MSE to the base's output for the same seed
        return float(((sample_latents(sampler, prompt, SEEDS) - sample_latents(base, prompt, SEEDS)) ** 2).mean())

    tuned = fine_tune(base_dir, cat_photos, tmp_path, prior_loss_weight=1.0)
    assert len(list((tmp_path / "cache" / "class_images").glob("*.png"))) == 8  # made by the base's sampler
    no_prior = fine_tune(base_dir, cat_photos, tmp_path, prior_loss_weight=0.0)

    # The instance prompt learns the subject (observed: 0.98 -> 0.21).
    base_to_subject = to_subject(sample_latents(base, INSTANCE_PROMPT, SEEDS))
    assert to_subject(sample_latents(tuned, INSTANCE_PROMPT, SEEDS)) < 0.5 * base_to_subject
    # With prior preservation the class prompt stays near the base's outputs while the instance
    # prompt moves (observed drift 0.21 vs 0.71) ...
    class_drift = drift(tuned, CLASS_PROMPT)
    assert class_drift < 0.5 * drift(tuned, INSTANCE_PROMPT)
    # ... and without it the class prompt drifts to the subject as well (language drift, Ruiz et al.
    # sec. 4.3): observed drift 0.67, distance to the subject 0.24 (0.79 with prior preservation).
    assert class_drift < 0.5 * drift(no_prior, CLASS_PROMPT)
    class_to_subject = to_subject(sample_latents(tuned, CLASS_PROMPT, SEEDS))
    assert to_subject(sample_latents(no_prior, CLASS_PROMPT, SEEDS)) < 0.5 * class_to_subject


def test_class_images_resume_and_split_across_ranks(base_model, tmp_path):
    settings = SampleSettings(steps=2, guidance_scale=1.0, height=32, width=32)
    rank0 = generate_class_images(tmp_path, CLASS_PROMPT, 5, base_model, rank=0, world_size=2, settings=settings)
    rank1 = generate_class_images(tmp_path, CLASS_PROMPT, 5, base_model, rank=1, world_size=2, settings=settings)
    assert (rank0, rank1) == ([0, 2, 4], [1, 3])
    first = class_image_path(tmp_path, 3).read_bytes()
    class_image_path(tmp_path, 1).unlink()
    class_image_path(tmp_path, 4).unlink()
    assert generate_class_images(tmp_path, CLASS_PROMPT, 5, base_model, settings=settings) == [1, 4]
    assert class_image_path(tmp_path, 3).read_bytes() == first  # untouched
    assert (tmp_path / "class-00001.txt").read_text().strip() == CLASS_PROMPT


def test_instance_folder_errors(tmp_path, cat_photos, base_model, caplog):
    with pytest.raises(DataError, match="holds no image"):
        instance_images(tmp_path)
    (tmp_path / "notes.pdf").write_bytes(b"%PDF-1.4 not an image")
    Image.new("RGB", (8, 8)).save(tmp_path / "ok.png")
    with pytest.raises(DataError, match=r"not images: \['notes.pdf'\]"):
        instance_images(tmp_path)
    data = DreamBoothDataModule(str(cat_photos), CLASS_PROMPT, str(base_model), str(tmp_path / "cache"), 32,
                                class_prompt=CLASS_PROMPT, num_class_images=1, class_sample_steps=1)  # fmt: skip
    with pytest.raises(RuntimeError, match="once setup"):
        data.manifest  # noqa: B018 (the data is prepared in setup)
    with caplog.at_level(logging.WARNING):
        data.setup("fit")  # no trainer: one process prepares everything
    assert "class_prompt equals data.instance_prompt" in caplog.text
    assert data.manifest.num_samples == 4 and set(data.streams) == {"instance", "class"}


def test_interrupted_run_resumes_exactly(base_model, cat_photos, tmp_path):
    """Stopped at step 2 (where both streams end an epoch: 4 photos and 2 class images, batches of 2)
    and resumed to step 4: weights, optimizer state, schedule, RNG states and both streams' positions
    (batches consumed) equal those of an uninterrupted 4-step run, bit for bit. (Lightning itself
    counts one epoch more after such a resume; the streams' positions do not depend on it.)"""
    cache = tmp_path / "cache"  # the first run generates and encodes; the others reuse

    def train(run: str, steps: int, *extra: str) -> Path:
        overrides = dreambooth_overrides("dreambooth", base_model, cat_photos, cache, tmp_path / run, steps=steps)
        run_train(compose_config("train", [*overrides, *extra]))
        return tmp_path / run / "checkpoints" / "last.ckpt"

    whole = train("whole", 4)
    assert load_checkpoint(train("stopped", 2))["DreamBoothDataModule"]["instance"]["batches"] == 2
    resumed = train("stopped", 4, "ckpt_path=last")
    assert_resume_is_exact(resumed, whole, data_module="DreamBoothDataModule")
    a, b = load_checkpoint(resumed), load_checkpoint(whole)
    assert consumed_batches(a["DreamBoothDataModule"]) == {"instance": 4, "class": 4}
    assert_same_nested(a["callbacks"]["RNGState"], b["callbacks"]["RNGState"], "RNG states")


@pytest.mark.parametrize(("precision", "in_bucket"), [("32-true", False), ("bf16-true", True)])
def test_text_encoder_trains_with_the_unet(
    base_model, cat_photos, tmp_path, precision, in_bucket, request, monkeypatch
):
    """``in_bucket``: ``model.pretrained=s3://...`` (the base model uploaded to the test S3 server; the
    local folder is named nowhere), its encoder and tokenizer loaded from the download cache's copy."""
    run, pretrained, cache = tmp_path / "run", base_model, tmp_path / "object-cache"
    if in_bucket:
        pretrained = f"{request.getfixturevalue('s3_bucket')}/models/base"
        object_store.upload_folder(base_model, pretrained)
        monkeypatch.setenv(CACHE_DIR_VARIABLE, str(cache))
    overrides = dreambooth_overrides("dreambooth_text_encoder", pretrained, cat_photos, tmp_path / "c", run)
    validation = ["callbacks.validation_images.every_n_steps=2", f"trainer.precision={precision}"]
    run_train(compose_config("train", [*overrides, "optim.text_encoder_lr=1e-3", *validation]))
    grids = sorted(p.name for p in (run / "csv").rglob("validation-step*.png"))
    assert grids == ["validation-step0000002.png", "validation-step0000003.png"]  # every 2 steps and the last
    if in_bucket:  # the trained encoder and its tokenizer came from the bucket's copy
        for part in ("text_encoder", "tokenizer"):
            (copy,) = cache.glob(f"*/*/{part}")  # <cache>/<URL key>/<version>/<part>
            assert sorted(p.name for p in copy.iterdir()) == sorted(p.name for p in (base_model / part).iterdir())
    export = export_last(run, tmp_path / "export")
    assert changed_parts(base_model, export) == {"unet", "text_encoder"}
    Sampler.from_export(export, device="cpu").txt2img([INSTANCE_PROMPT], [0], SampleSettings(steps=2))


@pytest.mark.dist
def test_text_encoder_trains_under_zero2_bf16_on_two_processes(base_model, cat_photos, tmp_path):
    from tests.integration.cli import run_cli

    run = tmp_path / "run"
    overrides = dreambooth_overrides("dreambooth_text_encoder", base_model, cat_photos, tmp_path / "c", run)
    result = run_cli("lf-train", *overrides, "optim.text_encoder_lr=1e-3", "strategy=deepspeed_stage_2",
                     "trainer.precision=bf16-mixed", "trainer.devices=2", cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    export = export_last(run, tmp_path / "export")
    assert changed_parts(base_model, export) == {"unet", "text_encoder"}
    Sampler.from_export(export, device="cpu").txt2img([INSTANCE_PROMPT], [0], SampleSettings(steps=2))
