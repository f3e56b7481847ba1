"""Aspect-ratio buckets: generation, assignment, preprocessing, and one-shape batches."""

import math

import numpy as np
import pytest
import torch
from PIL import Image

from data_pipelines.loading.datamodules import collate_latents
from data_pipelines.transforms.buckets import BucketBatcher, BucketResizeCrop, BucketSet, generate_buckets


def test_generated_buckets_have_about_equal_area_and_bounded_ratios():
    buckets = generate_buckets(base_resolution=512, step=64, max_ratio=2.0)
    assert buckets.sizes == ((640, 384), (576, 448), (512, 512), (448, 576), (384, 640))
    assert buckets.resolution == 512
    fine = generate_buckets(base_resolution=1024, step=32, max_ratio=3.0)
    for height, width in fine.sizes:
        assert height % 32 == 0 and width % 32 == 0
        assert 0.9 <= height * width / 1024**2 <= 1.0
        assert max(height / width, width / height) <= 3.0
        assert (width, height) in fine.sizes  # every shape has its transpose
    ratios = [w / h for h, w in fine.sizes]
    assert ratios == sorted(ratios) and len(fine.sizes) > 10


def test_explicit_list_and_bad_settings():
    buckets = BucketSet([[512, 512], [384, 640], [640, 384], [512, 512]])
    assert buckets.sizes == ((640, 384), (512, 512), (384, 640))
    assert buckets.to_list() == [[640, 384], [512, 512], [384, 640]]
    with pytest.raises(ValueError, match="not a multiple of step"):
        generate_buckets(500, 64)
    with pytest.raises(ValueError, match="at least one"):
        BucketSet([])


def test_each_image_goes_to_the_bucket_of_nearest_aspect_ratio():
    buckets = generate_buckets(512, 64, 2.0)
    cases = {(1000, 1000): (512, 512), (300, 700): (384, 640), (700, 300): (640, 384), (480, 640): (448, 576)}
    for (height, width), expected in cases.items():
        assert buckets.sizes[buckets.nearest(height, width)] == expected
    assert buckets.sizes[buckets.nearest(100, 10_000)] == (384, 640)  # beyond the widest: the widest


def test_bucket_transform_resizes_center_crops_and_records():
    transform = BucketResizeCrop(generate_buckets(32, 8, 2.0))
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (30, 60, 3), dtype=np.uint8))  # 60 wide
    pixels, info = transform(image)
    assert pixels.shape == (3, 24, 40) and pixels.dtype == torch.float32
    assert pixels.min() >= -1 and pixels.max() <= 1
    assert info == {"original_size": [30, 60], "crop_top_left": [0, 4], "bucket": 2, "target_size": [24, 40]}
    settings = transform.settings()
    assert settings["buckets"] == [[40, 24], [32, 32], [24, 40]] and settings["resolution"] == 32
    assert BucketResizeCrop(generate_buckets(32, 4, 2.0)).settings() != settings  # another set: another cache key


def test_batcher_yields_batches_of_one_shape_with_bounded_buffers():
    rng = np.random.default_rng(0)
    shapes = [(4, 10, 6), (4, 8, 8), (4, 6, 10)]
    samples = [(np.zeros(shapes[i], np.float16), np.zeros((8, 32), np.float16)) for i in rng.integers(0, 3, 100)]
    held = []

    def watched():
        for count, sample in enumerate(samples, start=1):
            held.append(count - 4 * len(emitted))  # samples in, minus samples out so far
            yield sample

    emitted = []
    for batch in BucketBatcher(4, collate_latents)(watched()):
        emitted.append(batch)
        assert batch["latents"].shape[0] == 4 and batch["text"].shape == (4, 8, 32)
    assert {tuple(b["latents"].shape[1:]) for b in emitted} <= set(shapes)
    assert max(held) <= 3 * (4 - 1) + 1, "at most buckets x (batch - 1) + 1 samples held"
    tail = list(BucketBatcher(4, collate_latents, partial=True)(iter(samples)))
    assert sum(b["latents"].shape[0] for b in tail) == 100
    assert all(len({tuple(x.shape) for x in b["latents"]}) == 1 for b in tail)


def test_bucket_area_is_about_the_base_area():
    buckets = generate_buckets(768, 64, 2.0)
    assert all(abs(math.log(h * w / 768**2)) < 0.1 for h, w in buckets.sizes)
