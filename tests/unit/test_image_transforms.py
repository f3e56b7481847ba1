import numpy as np
import torch
from PIL import Image

from data_pipelines.transforms.images import ResizeCrop, pixels_to_images


def test_center_crop_of_a_wide_image():
    image = Image.new("RGB", (60, 30), (255, 0, 0))
    image.paste((0, 0, 255), (0, 0, 8, 30))  # a blue left edge: cropped away
    pixels, info = ResizeCrop(16, crop="center")(image)
    assert pixels.shape == (3, 16, 16) and pixels.dtype == torch.float32
    assert info == {"original_size": [30, 60], "crop_top_left": [0, 8], "target_size": [16, 16], "resolution": 16}
    assert torch.allclose(pixels[0], torch.ones(16, 16), atol=0.02) and pixels[2].max() < -0.9


def test_random_crop_offset_is_recorded_and_seeded():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (20, 40, 3), dtype=np.uint8))
    first = ResizeCrop(20, crop="random")(image, np.random.default_rng(5))
    second = ResizeCrop(20, crop="random")(image, np.random.default_rng(5))
    assert first[1] == second[1] and torch.equal(first[0], second[0])
    top, left = first[1]["crop_top_left"]
    assert top == 0 and 0 <= left <= 20


def test_pixels_to_images_inverts_the_scaling():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (8, 8, 3), dtype=np.uint8))
    pixels, _ = ResizeCrop(8)(image)
    assert np.array_equal(np.asarray(pixels_to_images(pixels[None])[0]), np.asarray(image))
