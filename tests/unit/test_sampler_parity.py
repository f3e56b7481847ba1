"""Our sampler against diffusers' pipelines on the same export, seed and scheduler config.

Both run the same weights with per-image CPU generators; the loops differ only in code. The
largest difference allowed is 2 of 255 per pixel channel (float rounding in the two decoders'
[-1, 1] -> uint8 conversions; the benchmark measures 0).
"""

import numpy as np
import pytest
import torch
from PIL import Image

from trainer.sampling.sampler import Sampler, SampleSettings
from trainer.sampling.schedulers import make_scheduler
from trainer.tiny_models.tiny_pipeline import make_tiny_export

MAX_PIXEL_DIFFERENCE = 2
PROMPTS = ["a handwritten digit three", "a handwritten digit eight"]
SEEDS = [5, 6]
STEPS = 4
# Karras sigmas on the tiny model's cosine schedule repeat timesteps at few steps; SD 1.x's schedule does not.
SD1_SCHEDULE = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}


@pytest.fixture(scope="module")
def export_dir(pretrained_dir, tmp_path_factory):
    return make_tiny_export(pretrained_dir, tmp_path_factory.mktemp("parity") / "export")


@pytest.fixture(scope="module")
def sampler(export_dir):
    return Sampler.from_export(export_dir, device="cpu")


def _schedule(config: dict, karras: bool) -> dict:
    return {**config, **SD1_SCHEDULE} if karras else dict(config)


def _diffusers(pipeline_class, export_dir, scheduler: str, karras: bool):
    pipe = pipeline_class.from_pretrained(export_dir, local_files_only=True, safety_checker=None)
    pipe.scheduler = make_scheduler(scheduler, _schedule(pipe.scheduler.config, karras), karras)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _max_difference(ours: list[Image.Image], theirs: list[Image.Image]) -> int:
    a = np.stack([np.asarray(i, dtype=np.int16) for i in ours])
    b = np.stack([np.asarray(i, dtype=np.int16) for i in theirs])
    assert a.shape == b.shape == (len(ours), 32, 32, 3)
    return int(np.abs(a - b).max())


CASES = [
    ("ddim", False),
    ("euler", False),
    ("euler_a", False),
    ("dpmpp_2m", False),
    ("euler", True),
    ("dpmpp_2m", True),
]


@pytest.mark.parametrize(("scheduler", "karras"), CASES)
def test_txt2img_matches_stable_diffusion_pipeline(sampler, export_dir, scheduler, karras):
    from diffusers import StableDiffusionPipeline

    settings = SampleSettings(steps=STEPS, guidance_scale=3.0, scheduler=scheduler, use_karras_sigmas=karras)
    config = sampler.scheduler_config
    sampler.scheduler_config = _schedule(config, karras)
    try:
        ours, _ = sampler.txt2img(PROMPTS, SEEDS, settings)
    finally:
        sampler.scheduler_config = config
    pipe = _diffusers(StableDiffusionPipeline, export_dir, scheduler, karras)
    theirs = pipe(
        PROMPTS,
        num_inference_steps=STEPS,
        guidance_scale=3.0,
        height=32,
        width=32,
        generator=[torch.Generator().manual_seed(s) for s in SEEDS],
    ).images
    assert _max_difference(ours, theirs) <= MAX_PIXEL_DIFFERENCE


@pytest.mark.parametrize(("scheduler", "karras"), CASES[:4])
def test_img2img_matches_img2img_pipeline(sampler, export_dir, scheduler, karras):
    from diffusers import StableDiffusionImg2ImgPipeline

    rng = np.random.default_rng(0)
    init = Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    settings = SampleSettings(steps=STEPS, guidance_scale=3.0, scheduler=scheduler)
    ours, _ = sampler.img2img(init, PROMPTS, SEEDS, settings, strength=0.5)
    pipe = _diffusers(StableDiffusionImg2ImgPipeline, export_dir, scheduler, karras)
    theirs = pipe(
        PROMPTS,
        image=init,
        strength=0.5,
        num_inference_steps=STEPS,
        guidance_scale=3.0,
        generator=[torch.Generator().manual_seed(s) for s in SEEDS],
    ).images
    assert _max_difference(ours, theirs) <= MAX_PIXEL_DIFFERENCE


# One image: diffusers' inpainting pipeline samples the init image's posterior once, with the first
# image's generator, and repeats it over the batch (we draw one per image, as its img2img does).
# Euler ancestral included: that pipeline draws from the generators once more (it encodes the masked
# image) after the starting noise, and our sampler skips the same draw.
@pytest.mark.parametrize("scheduler", ["ddim", "euler", "euler_a", "dpmpp_2m"])
def test_inpainting_matches_inpaint_pipeline_on_a_standard_unet(sampler, export_dir, scheduler):
    from diffusers import StableDiffusionInpaintPipeline

    rng = np.random.default_rng(2)
    init = Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    mask = np.zeros((32, 32), dtype=np.uint8)
    mask[8:24, 8:24] = 255
    mask = Image.fromarray(mask)
    settings = SampleSettings(steps=STEPS, guidance_scale=3.0, scheduler=scheduler)
    ours, _ = sampler.inpaint(init, mask, PROMPTS[:1], SEEDS[:1], settings, strength=1.0)
    pipe = _diffusers(StableDiffusionInpaintPipeline, export_dir, scheduler, False)
    theirs = pipe(
        PROMPTS[:1],
        image=init,
        mask_image=mask,
        strength=1.0,
        num_inference_steps=STEPS,
        guidance_scale=3.0,
        height=32,
        width=32,
        generator=[torch.Generator().manual_seed(s) for s in SEEDS[:1]],
    ).images
    assert _max_difference(ours, theirs) <= MAX_PIXEL_DIFFERENCE


def test_size_and_crop_inputs_are_refused_for_a_model_without_them(sampler):
    from lf_common.errors import ConfigError

    settings = SampleSettings(steps=1, original_size=(64, 64))
    with pytest.raises(ConfigError, match="original_size and crop_top_left condition SDXL models only"):
        sampler.txt2img(PROMPTS[:1], SEEDS[:1], settings)
