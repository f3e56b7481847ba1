import pytest
from PIL import Image

from trainer.sampling.png_info import GenerationParameters, image_grid, parse_parameters, read_parameters, save_png


def test_parameters_in_automatic1111_layout(tmp_path):
    parameters = GenerationParameters(
        prompt="a handwritten digit seven",
        negative_prompt="blurry",
        steps=25,
        sampler="DDIM",
        guidance_scale=3.0,
        seed=42,
        width=32,
        height=32,
        model="export",
    )
    path = save_png(Image.new("RGB", (32, 32)), tmp_path / "x.png", parameters)
    assert read_parameters(path) == (
        "a handwritten digit seven\nNegative prompt: blurry\n"
        "Steps: 25, Sampler: DDIM, CFG scale: 3, Seed: 42, Size: 32x32, Model: export"
    )


def test_grid_tiles_row_by_row():
    images = [Image.new("RGB", (4, 4), (i * 40, 0, 0)) for i in range(6)]
    grid = image_grid(images, columns=3)
    assert grid.size == (12, 8)
    assert grid.getpixel((9, 5)) == (200, 0, 0)


def test_parameters_parse_back_including_automatic1111s_own():
    made = GenerationParameters("a cat\non two lines", "blurry", 25, "DPM++ 2M Karras", 7.5, 42, 32, 48, "m", 0.5, 0.7)
    assert parse_parameters(made.to_text()) == made
    theirs = parse_parameters(
        "x\nSteps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1, Size: 512x768, "
        'Model hash: abc, Lora hashes: "a: 1, b: 2", Version: v1.10.1'
    )
    assert (theirs.prompt, theirs.sampler, theirs.width, theirs.height, theirs.negative_prompt) == (
        "x",
        "DPM++ 2M Karras",
        512,
        768,
        None,  # no "Negative prompt:" line: none given (SDXL samples zeros, as AUTOMATIC1111 does)
    )
    with pytest.raises(ValueError, match=r"x\.png: the parameters text lacks \['Seed'\]"):
        parse_parameters("x\nSteps: 20, Sampler: Euler, CFG scale: 7, Size: 8x8", source="x.png")


def test_an_explicit_empty_negative_prompt_parses_back_apart_from_none():
    """SDXL samples zeros for no negative prompt and encodes an explicit ``""``: both must re-make as made."""
    for negative in (None, ""):
        made = GenerationParameters("a cat", negative, 25, "Euler", 7.5, 42, 32, 32)
        assert parse_parameters(made.to_text()).negative_prompt == negative


def test_sdxl_size_and_crop_inputs_parse_back():
    micro = {"original_size": (64, 48), "crop_top_left": (4, 8)}
    made = GenerationParameters("a cat", None, 25, "Euler", 7.5, 42, 32, 32, **micro)
    assert "Original size: 48x64, Crop offset: 8x4" in made.to_text()
    assert parse_parameters(made.to_text()) == made
