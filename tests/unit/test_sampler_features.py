"""lf-sample's inpainting, prompt files, from_png, VAE options and its errors, on a tiny export."""

import numpy as np
import pytest
import torch
from PIL import Image

from lf_common.errors import DataError
from tests.conftest import compose_config
from trainer.cli.sample import run_sample
from trainer.sampling.png_info import read_parameters
from trainer.sampling.sampler import Sampler, SampleSettings
from trainer.tiny_models.tiny_pipeline import make_tiny_export


@pytest.fixture(scope="module")
def export_dir(pretrained_dir, tmp_path_factory):
    return make_tiny_export(pretrained_dir, tmp_path_factory.mktemp("features") / "export")


@pytest.fixture(scope="module")
def init_image(tmp_path_factory):
    path = tmp_path_factory.mktemp("images") / "init.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(path)
    return path


def sample(export_dir, out, *overrides):
    return run_sample(
        compose_config(
            "sample", [f"model_dir={export_dir}", f"out_dir={out}", "steps=3", "num_images_per_prompt=2", *overrides]
        )
    )


def _pixels(path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def _mask(size: int = 32) -> Image.Image:
    mask = np.zeros((size, size), dtype=np.uint8)
    mask[:, size // 2 :] = 255  # repaint the right half
    return Image.fromarray(mask)


def test_inpainting_keeps_the_unmasked_latents(export_dir, init_image):
    sampler = Sampler.from_export(export_dir, device="cpu")
    settings = SampleSettings(steps=3, guidance_scale=3.0, scheduler="euler_a")
    with Image.open(init_image) as image:
        latents, init, mask = sampler.inpaint_latents(image.convert("RGB"), _mask(), ["a"] * 2, [1, 2], settings)
    assert mask.shape == (1, 1, 8, 8) and mask[..., :4].sum() == 0 and mask[..., 4:].min() == 1
    keep = mask.expand_as(latents) == 0
    assert torch.equal(latents[keep], init[keep]), "outside the mask the init image's latents stay"
    assert not torch.allclose(latents[~keep], init[~keep]), "inside it the model draws"


def test_inpainting_from_the_command_line(export_dir, tmp_path):
    # a 48x64 photo and its mask are resized and center-cropped alike to the 32x32 output
    Image.fromarray(np.random.default_rng(3).integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(tmp_path / "i.png")
    mask = np.zeros((48, 64), dtype=np.uint8)
    mask[:, 32:] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    result = sample(
        export_dir, tmp_path / "s", f"init_image={tmp_path / 'i.png'}", f"mask_image={tmp_path / 'mask.png'}"
    )
    assert len(result["paths"]) == 2 and result["images"][0].size == (32, 32)
    assert "Denoising strength: 1" in read_parameters(result["paths"][0])


def test_mask_of_the_wrong_size_is_named(export_dir, init_image, tmp_path):
    _mask(16).save(tmp_path / "small.png")
    with pytest.raises(ValueError, match=r"mask is 16x16, expected the init image's size 32x32"):
        sample(export_dir, tmp_path / "s", f"init_image={init_image}", f"mask_image={tmp_path / 'small.png'}")


def test_from_png_remakes_the_same_pixels(export_dir, tmp_path):
    first = sample(
        export_dir,
        tmp_path / "a",
        'prompts=["a handwritten digit four"]',
        "negative_prompt=blurry",
        "scheduler=euler_a",
        "seed=21",
        "guidance_scale=2.5",
        "batch_size=1",  # exact pixels need the same batch layout (CPU kernels differ by batch: up to 1/255)
    )
    again = sample(export_dir, tmp_path / "b", f"from_png={first['paths'][1]}")
    assert len(again["paths"]) == 1
    assert read_parameters(again["paths"][0]) == read_parameters(first["paths"][1])
    assert np.array_equal(_pixels(again["paths"][0]), _pixels(first["paths"][1]))


def test_prompt_file_one_prompt_per_line(export_dir, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a digit one\n\na digit two\n", encoding="utf-8")
    result = sample(export_dir, tmp_path / "s", f"prompt_file={prompts}", "num_images_per_prompt=1")
    assert result["prompts"] == ["a digit one", "a digit two"]


def test_vae_slicing_and_tiling_give_the_same_images(export_dir, tmp_path):
    plain = sample(export_dir, tmp_path / "a")
    sliced = sample(export_dir, tmp_path / "b", "vae_slicing=true", "vae_tiling=true")
    for a, b in zip(plain["paths"], sliced["paths"], strict=True):
        assert np.abs(_pixels(a).astype(int) - _pixels(b).astype(int)).max() <= 1


@pytest.mark.parametrize(
    ("overrides", "error", "message"),
    [
        (["scheduler=heun"], ValueError, r"scheduler='heun': expected one of \['ddim', 'dpmpp_2m'"),
        (["scheduler=ddim", "use_karras_sigmas=true"], ValueError, r"scheduler='ddim' has no Karras sigmas"),
        (["strength=1.5"], ValueError, r"strength=1.5: expected 0 < strength <= 1"),
        (["strength=0"], ValueError, r"strength=0: expected 0 < strength <= 1"),
        (["prompt_file=/nowhere/prompts.txt"], DataError, r"/nowhere/prompts\.txt: prompt_file does not exist"),
        (["from_png=/nowhere/x.png"], DataError, r"/nowhere/x\.png: from_png does not exist"),
        (["init_image=/nowhere/i.png"], DataError, r"/nowhere/i\.png: init_image does not exist"),
    ],
)
def test_bad_input_gets_a_clear_error(export_dir, tmp_path, overrides, error, message):
    with pytest.raises(error, match=message):
        sample(export_dir, tmp_path / "s", *overrides)
