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

from lf_common.errors import ConfigError
from tests.small_sdxl import WIDTH, save_small_sdxl
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


def _max_difference(ours: list[Image.Image], theirs: list[Image.Image], size: tuple[int, int] = (SIZE, SIZE)) -> int:
    a, b = _pixels(ours), _pixels(theirs)
    assert a.shape == b.shape == (len(ours), *size, 3)
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
    """The command: SDXL inpainting with an explicit empty negative prompt, size/crop inputs and second prompts,
    written into the PNG and re-made from it pixel for pixel."""
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
        "crop_top_left=[4,8]", "scheduler=euler_a", "strength=0.8", "prompt_2='in red, ink'", "negative_prompt_2=dark",
    ]))  # fmt: skip
    text = read_parameters(first["paths"][0])
    assert "Negative prompt: \n" in text and "Original size: 48x64" in text and "Crop offset: 8x4" in text
    assert 'Prompt 2: "in red, ink", Negative prompt 2: "dark"' in text
    again = run_sample(compose_config("sample", [
        *common, f"out_dir={tmp_path / 'b'}", f"from_png={first['paths'][0]}", f"init_image={init}",
        f"mask_image={mask}",
    ]))  # fmt: skip
    assert read_parameters(again["paths"][0]) == text
    assert np.array_equal(_pixels([Image.open(again["paths"][0])]), _pixels([Image.open(first["paths"][0])]))


def test_prompt_2_and_negative_prompt_2_as_stable_diffusion_xl_pipeline(sampler, export_dir):
    """The second encoder reads its own texts (``None``: the first's); the embeddings and the images match the
    pipeline's ``prompt_2``/``negative_prompt_2``; a second negative prompt where SDXL's negative is zeros is
    refused (the pipeline drops it silently)."""
    from diffusers import StableDiffusionXLPipeline

    pipe = _diffusers(StableDiffusionXLPipeline, export_dir, "euler", False)
    texts = {"prompt_2": "a digit in red ink", "negative_prompt": "blurry", "negative_prompt_2": "dark"}
    theirs_texts = {**texts, "prompt_2": [texts["prompt_2"]] * len(PROMPTS)}  # it repeats no prompt_2 string
    with torch.no_grad():
        expected = pipe.encode_prompt(PROMPTS, device="cpu", do_classifier_free_guidance=True, **theirs_texts)
    cond, pooled = sampler.prompt_encoder.encode(PROMPTS, texts["prompt_2"])
    uncond, uncond_pooled = sampler.negative_embeddings("blurry", len(PROMPTS), "dark")
    for ours, theirs in zip((cond, uncond, pooled, uncond_pooled), expected, strict=True):
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    same, _ = sampler.prompt_encoder.encode(PROMPTS)
    torch.testing.assert_close(cond[..., :WIDTH], same[..., :WIDTH], atol=0, rtol=0)  # the first reads the prompt
    assert not torch.allclose(cond[..., WIDTH:], same[..., WIDTH:]), "the second encoder reads prompt_2"
    plain, _ = sampler.negative_embeddings("blurry", len(PROMPTS))
    assert not torch.allclose(uncond[..., WIDTH:], plain[..., WIDTH:]), "and negative_prompt_2"

    settings = _settings("euler", **texts)
    ours, parameters = sampler.txt2img(PROMPTS, SEEDS, settings)
    assert (parameters[0].prompt_2, parameters[0].negative_prompt_2) == ("a digit in red ink", "dark")
    theirs = pipe(PROMPTS, num_inference_steps=STEPS, guidance_scale=3.0, height=SIZE, width=SIZE,
                  generator=_generators(SEEDS), **theirs_texts).images  # fmt: skip
    assert _max_difference(ours, theirs) <= MAX_PIXEL_DIFFERENCE

    with pytest.raises(ConfigError, match="negative_prompt_2 without negative_prompt"):
        sampler.txt2img(PROMPTS[:1], SEEDS[:1], _settings("euler", negative_prompt_2="dark"))


def test_non_square_img2img_and_inpainting_match_the_pipelines(sampler, export_dir):
    """A 48 px wide, 32 px high init image at that output size: as the SDXL img2img and inpainting pipelines
    (which take the image's size as original and target size)."""
    from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLInpaintPipeline

    height, width = 32, 48
    init = Image.fromarray(np.random.default_rng(4).integers(0, 256, (height, width, 3), dtype=np.uint8))
    settings = SampleSettings(steps=STEPS, guidance_scale=3.0, height=height, width=width, scheduler="euler")
    common = {"num_inference_steps": STEPS, "guidance_scale": 3.0}
    ours, parameters = sampler.img2img(init, PROMPTS, SEEDS, settings, strength=0.5)
    assert ours[0].size == (width, height) and parameters[0].original_size is None  # the output size: not written
    theirs = _diffusers(StableDiffusionXLImg2ImgPipeline, export_dir, "euler", False)(
        PROMPTS, image=init, strength=0.5, generator=_generators(SEEDS), **common
    ).images
    assert _max_difference(ours, theirs, (height, width)) <= MAX_PIXEL_DIFFERENCE

    holes = np.zeros((height, width), dtype=np.uint8)
    holes[8:24, 10:40] = 255
    mask = Image.fromarray(holes)
    ours, _ = sampler.inpaint(init, mask, PROMPTS[:1], SEEDS[:1], settings, strength=0.75)
    theirs = _diffusers(StableDiffusionXLInpaintPipeline, export_dir, "euler", False)(
        PROMPTS[:1], image=init, mask_image=mask, strength=0.75, height=height, width=width,
        generator=_generators(SEEDS[:1]), **common,
    ).images  # fmt: skip
    assert _max_difference(ours, theirs, (height, width)) <= MAX_PIXEL_DIFFERENCE


def test_img2img_tells_sdxl_the_init_images_size(sampler):
    """A 96x64 photo made into a 48x32 image: the UNet's time_ids say original size (64, 96), target (32, 48),
    and the PNG parameters record it, so ``from_png`` re-makes the same image."""
    seen: list[torch.Tensor] = []
    handle = sampler.unet.register_forward_pre_hook(
        lambda _, args, kwargs: seen.append(kwargs["added_cond_kwargs"]["time_ids"]), with_kwargs=True
    )
    init = Image.fromarray(np.random.default_rng(5).integers(0, 256, (64, 96, 3), dtype=np.uint8))
    try:
        settings = SampleSettings(steps=2, guidance_scale=3.0, height=32, width=48, scheduler="euler")
        _, parameters = sampler.img2img(init, PROMPTS[:1], SEEDS[:1], settings, 0.5)
    finally:
        handle.remove()
    assert seen and all(ids.tolist() == [[64, 96, 0, 0, 32, 48]] * 2 for ids in seen)  # (uncond, cond)
    assert parameters[0].original_size == (64, 96) and "Original size: 96x64" in parameters[0].to_text()


@pytest.mark.parametrize(
    ("sdxl", "force_upcast", "held", "expected"),
    [
        (True, True, torch.float16, torch.float32),  # SDXL's VAE overflows in float16: upcast, as diffusers
        (True, False, torch.float16, torch.float16),  # a VAE fixed for float16 says so
        (True, True, torch.bfloat16, torch.bfloat16),  # bfloat16 has float32's range
        (False, True, torch.float16, torch.float16),  # SD 1.x/2.x pipelines ignore the flag
    ],
)
def test_the_vae_decodes_and_encodes_in_the_dtype_its_config_asks_for(export_dir, sdxl, force_upcast, held, expected):
    from diffusers import AutoencoderKL

    from trainer.sampling.vae_codec import codec_dtype, decode_images, vae_in

    vae = AutoencoderKL.from_pretrained(export_dir / "vae", local_files_only=True, torch_dtype=held)
    vae.register_to_config(force_upcast=force_upcast)
    dtype = codec_dtype(vae, sdxl)
    assert dtype == expected
    seen: list[torch.dtype] = []
    for conv in (vae.decoder.conv_in, vae.encoder.conv_in):
        conv.register_forward_pre_hook(lambda _, args: seen.append(args[0].dtype))
    images = decode_images(vae, torch.randn(1, 4, 16, 24, dtype=held), dtype)  # (1, 3, 32, 48)
    with vae_in(vae, dtype):
        vae.encode(torch.zeros(1, 3, 32, 48, dtype=dtype))
    assert seen == [expected, expected] and images[0].size == (48, 32)
    assert vae.dtype == held and all(p.dtype == held for p in vae.parameters()), "the VAE is held as it was"


def test_the_sampler_decodes_an_sdxl_vae_in_float32_when_float16(sampler):
    sampler.vae.to(torch.float16)
    try:
        assert sampler.vae.config.force_upcast and sampler.vae_dtype == torch.float32
        seen: list[torch.dtype] = []
        handle = sampler.vae.decoder.conv_in.register_forward_pre_hook(lambda _, args: seen.append(args[0].dtype))
        sampler.txt2img(PROMPTS[:1], SEEDS[:1], SampleSettings(steps=1, height=16, width=16, scheduler="euler"))
        handle.remove()
        assert seen == [torch.float32] and sampler.vae.dtype == torch.float16
    finally:
        sampler.vae.to(torch.float32)
