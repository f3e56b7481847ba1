"""Our sampler against diffusers' SDXL pipelines on a small random SDXL export, same seeds and scheduler.

The SDXL counterpart of ``test_sampler_parity.py`` (same tolerance: 2 of 255 per pixel channel):
txt2img per scheduler against ``StableDiffusionXLPipeline``, img2img against
``StableDiffusionXLImg2ImgPipeline`` (a base model: ``requires_aesthetics_score`` false, so the
aesthetic scores are unused and time_ids are original size, crop (0, 0), target size), inpainting
with the base (4-channel) UNet against ``StableDiffusionXLInpaintPipeline``, and the negative prompt
as ``encode_prompt`` treats it (zeros only when none is given and ``force_zeros_for_empty_prompt``).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from tests.small_sdxl import save_small_sdxl
from trainer.sampling.sampler import Sampler, SampleSettings
from trainer.sampling.schedulers import SCHEDULERS, make_scheduler

MAX_PIXEL_DIFFERENCE = 2
PROMPTS = ["a handwritten digit three", "a handwritten digit eight"]
SEEDS = [5, 6]
STEPS = 4
SIZE = 32
# every scheduler the sampler offers, and Karras sigmas where it offers them (SDXL's scaled_linear
# schedule does not repeat timesteps at 4 steps)
CASES = [(name, False) for name in SCHEDULERS] + [("euler", True), ("dpmpp_2m", True)]


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    return save_small_sdxl(tmp_path_factory.mktemp("sdxl_parity") / "export")


@pytest.fixture(scope="module")
def sampler(export_dir):
    return Sampler.from_export(export_dir, device="cpu")


def _diffusers(pipeline_class, export_dir, scheduler: str, karras: bool):
    pipe = pipeline_class.from_pretrained(export_dir, local_files_only=True)
    pipe.scheduler = make_scheduler(scheduler, pipe.scheduler.config, karras)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _generators(seeds: list[int]) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(s) for s in seeds]


def _pixels(images: list[Image.Image]) -> np.ndarray:
    return np.stack([np.asarray(i, dtype=np.int16) for i in images])


def _max_difference(ours: list[Image.Image], theirs: list[Image.Image]) -> int:
    a, b = _pixels(ours), _pixels(theirs)
    assert a.shape == b.shape == (len(ours), SIZE, SIZE, 3)
    return int(np.abs(a - b).max())


def _settings(scheduler: str, **options) -> SampleSettings:
    return SampleSettings(steps=STEPS, guidance_scale=3.0, height=SIZE, width=SIZE, scheduler=scheduler, **options)


def _random_image(seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))


@pytest.mark.parametrize(("scheduler", "karras"), CASES)
def test_txt2img_matches_stable_diffusion_xl_pipeline(sampler, export_dir, scheduler, karras):
    from diffusers import StableDiffusionXLPipeline

    settings = SampleSettings(
        steps=STEPS, guidance_scale=3.0, height=SIZE, width=SIZE, scheduler=scheduler, use_karras_sigmas=karras
    )
    ours, _ = sampler.txt2img(PROMPTS, SEEDS, settings)
    theirs = _diffusers(StableDiffusionXLPipeline, export_dir, scheduler, karras)(
        PROMPTS, num_inference_steps=STEPS, guidance_scale=3.0, height=SIZE, width=SIZE, generator=_generators(SEEDS)
    ).images
    assert _max_difference(ours, theirs) <= MAX_PIXEL_DIFFERENCE


@pytest.mark.parametrize("scheduler", list(SCHEDULERS))
def test_img2img_matches_stable_diffusion_xl_img2img_pipeline(sampler, export_dir, scheduler):
    from diffusers import StableDiffusionXLImg2ImgPipeline

    init = _random_image(0)
    settings = _settings(scheduler)
    ours, _ = sampler.img2img(init, PROMPTS, SEEDS, settings, strength=0.5)
    pipe = _diffusers(StableDiffusionXLImg2ImgPipeline, export_dir, scheduler, False)
    assert not pipe.config.requires_aesthetics_score  # a base model's export: six time_ids, no aesthetic score
    theirs = pipe(
        PROMPTS, image=init, strength=0.5, num_inference_steps=STEPS, guidance_scale=3.0, generator=_generators(SEEDS)
    ).images
    assert _max_difference(ours, theirs) <= MAX_PIXEL_DIFFERENCE


# One image: diffusers' inpainting pipeline samples the init image's posterior once, with the first
# image's generator, and repeats it over the batch (we draw one per image, as its img2img does).
@pytest.mark.parametrize("scheduler", list(SCHEDULERS))
@pytest.mark.parametrize("strength", [1.0, 0.75])
def test_inpainting_matches_stable_diffusion_xl_inpaint_pipeline_on_the_base_unet(
    sampler, export_dir, scheduler, strength
):
    from diffusers import StableDiffusionXLInpaintPipeline

    assert sampler.unet.config.in_channels == 4
    init = _random_image(2)
    holes = np.zeros((SIZE, SIZE), dtype=np.uint8)
    holes[8:24, 8:24] = 255  # white: paint
    mask = Image.fromarray(holes)
    settings = _settings(scheduler)
    ours, _ = sampler.inpaint(init, mask, PROMPTS[:1], SEEDS[:1], settings, strength=strength)
    theirs = _diffusers(StableDiffusionXLInpaintPipeline, export_dir, scheduler, False)(
        PROMPTS[:1],
        image=init,
        mask_image=mask,
        strength=strength,
        num_inference_steps=STEPS,
        guidance_scale=3.0,
        height=SIZE,
        width=SIZE,
        generator=_generators(SEEDS[:1]),
    ).images
    assert _max_difference(ours, theirs) <= MAX_PIXEL_DIFFERENCE


@pytest.mark.parametrize("negative_prompt", [None, "", "blurry"])
def test_negative_prompt_as_stable_diffusion_xl_pipeline_encodes_it(sampler, export_dir, negative_prompt):
    """None: zeros (``force_zeros_for_empty_prompt``); an explicit ``""`` is encoded like any other text."""
    from diffusers import StableDiffusionXLPipeline

    pipe = _diffusers(StableDiffusionXLPipeline, export_dir, "euler", False)
    assert pipe.config.force_zeros_for_empty_prompt
    with torch.no_grad():
        _, expected, _, expected_pooled = pipe.encode_prompt(
            PROMPTS, device="cpu", do_classifier_free_guidance=True, negative_prompt=negative_prompt
        )
    text, pooled = sampler.negative_embeddings(negative_prompt, len(PROMPTS))
    torch.testing.assert_close(text, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(pooled, expected_pooled, atol=1e-5, rtol=0)
    if negative_prompt is None:
        assert not text.any() and not pooled.any()
    else:
        assert text.abs().max() > 0.1 and pooled.abs().max() > 0.1  # "" is not zeros

    ours, _ = sampler.txt2img(PROMPTS, SEEDS, _settings("euler", negative_prompt=negative_prompt))
    theirs = pipe(
        PROMPTS,
        negative_prompt=negative_prompt,
        num_inference_steps=STEPS,
        guidance_scale=3.0,
        height=SIZE,
        width=SIZE,
        generator=_generators(SEEDS),
    ).images
    assert _max_difference(ours, theirs) <= MAX_PIXEL_DIFFERENCE


def test_an_export_without_force_zeros_encodes_the_empty_negative_prompt(export_dir):
    """``force_zeros_for_empty_prompt: false`` in ``model_index.json``: no negative prompt encodes ``""``."""
    import json
    import shutil

    folder = export_dir.parent / "no_force_zeros"
    shutil.copytree(export_dir, folder, dirs_exist_ok=True)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "force_zeros_for_empty_prompt": False}))
    sampler = Sampler.from_export(folder, device="cpu")
    assert not sampler.force_zeros_for_empty_prompt
    for a, b in zip(sampler.negative_embeddings(None, 1), sampler.negative_embeddings("", 1), strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


MICRO = {"original_size": (64, 48), "crop_top_left": (4, 8)}  # (h, w), (top, left)


def test_size_and_crop_inputs_match_the_pipelines_original_size_and_crops_coords(sampler, export_dir):
    from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

    micro = {"original_size": MICRO["original_size"], "crops_coords_top_left": MICRO["crop_top_left"]}
    settings = _settings("euler", **MICRO)
    ours, parameters = sampler.txt2img(PROMPTS, SEEDS, settings)
    assert (parameters[0].original_size, parameters[0].crop_top_left) == ((64, 48), (4, 8))
    theirs = _diffusers(StableDiffusionXLPipeline, export_dir, "euler", False)(
        PROMPTS, num_inference_steps=STEPS, guidance_scale=3.0, height=SIZE, width=SIZE,
        generator=_generators(SEEDS), **micro,
    ).images  # fmt: skip
    assert _max_difference(ours, theirs) <= MAX_PIXEL_DIFFERENCE
    default, _ = sampler.txt2img(PROMPTS, SEEDS, _settings("euler"))
    assert np.abs(_pixels(default) - _pixels(ours)).max() > 0, "the size/crop inputs change nothing"

    init = _random_image(0)
    ours, _ = sampler.img2img(init, PROMPTS, SEEDS, settings, strength=0.5)
    theirs = _diffusers(StableDiffusionXLImg2ImgPipeline, export_dir, "euler", False)(
        PROMPTS, image=init, strength=0.5, num_inference_steps=STEPS, guidance_scale=3.0,
        generator=_generators(SEEDS), **micro,
    ).images  # fmt: skip
    assert _max_difference(ours, theirs) <= MAX_PIXEL_DIFFERENCE


def test_lf_sample_inpaints_with_sdxl_and_remakes_from_png(export_dir, tmp_path):
    """The command: SDXL inpainting with an explicit empty negative prompt and size/crop inputs, written
    into the PNG and re-made from it pixel for pixel."""
    from tests.conftest import compose_config
    from trainer.cli.sample import run_sample
    from trainer.sampling.png_info import read_parameters

    init, mask = tmp_path / "init.png", tmp_path / "mask.png"
    _random_image(3).save(init)
    holes = np.zeros((SIZE, SIZE), dtype=np.uint8)
    holes[4:20, 10:30] = 255
    Image.fromarray(holes).save(mask)
    common = [f"model_dir={export_dir}", "steps=3", "batch_size=1", "device=cpu"]
    first = run_sample(compose_config("sample", [
        *common, f"out_dir={tmp_path / 'a'}", f"init_image={init}", f"mask_image={mask}", "negative_prompt=''",
        "num_images_per_prompt=1", f"height={SIZE}", f"width={SIZE}", "original_size=[64,48]",
        "crop_top_left=[4,8]", "scheduler=euler_a", "strength=0.8",
    ]))  # fmt: skip
    text = read_parameters(first["paths"][0])
    assert "Negative prompt: \n" in text and "Original size: 48x64" in text and "Crop offset: 8x4" in text
    again = run_sample(compose_config("sample", [
        *common, f"out_dir={tmp_path / 'b'}", f"from_png={first['paths'][0]}", f"init_image={init}",
        f"mask_image={mask}",
    ]))  # fmt: skip
    assert read_parameters(again["paths"][0]) == text
    assert np.array_equal(_pixels([Image.open(again["paths"][0])]), _pixels([Image.open(first["paths"][0])]))
