"""Cached image augmentation: the variants precompute stores (seeded crops, mirror images), their format
member, and the training loader's draw among them (proportions, random_flip, resume, older shards)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from data_pipelines.latents.format import (
    LATENT_VARIANTS_KEY,
    VARIANTS_SETTING,
    EncoderInfo,
    LatentManifest,
    LatentSample,
    ShardEntry,
    decode_latent_sample,
    encode_latent_sample,
    save_uncond_embedding,
)
from data_pipelines.loading.datamodules import LatentShardDataModule
from data_pipelines.shards.tar_writer import open_tar_writer
from data_pipelines.transforms.augment import VariantSettings
from data_pipelines.transforms.images import CropVariant, ResizeCrop, image_to_pixels, render_variant
from lf_common.errors import ConfigError, CorruptSampleError

LATENT = (1, 2, 2)


def test_crops_are_seeded_by_key_inside_the_resize_and_mirror_images_follow_each_crop():
    settings = VariantSettings(flip=True, crops_per_image=3, seed=5)
    canonical = CropVariant(0, 8)
    plan = settings.plan("sample-1", canonical, (32, 48), (32, 32))
    assert len(plan) == settings.count == 8
    assert plan[0] == canonical and plan[1] == CropVariant(0, 8, flip=True)
    assert [v.flip for v in plan] == [False, True] * 4 and settings.kinds()[2] == (True, False)
    assert all(v.top == 0 and 0 <= v.left <= 16 for v in plan)  # inside the 32 x 48 resize
    assert plan == settings.plan("sample-1", canonical, (32, 48), (32, 32))  # a rerun draws the same
    lefts = {tuple(v.left for v in settings.plan(f"k{i}", canonical, (32, 48), (32, 32))[2::2]) for i in range(20)}
    assert len(lefts) > 10, "other keys draw other crops"
    assert VariantSettings(seed=6, crops_per_image=3).plan("sample-1", canonical, (32, 48), (32, 32))[1:] != [
        v for v in plan[2::2]
    ]
    with pytest.raises(ConfigError, match="crops_per_image=-1"):
        VariantSettings(crops_per_image=-1)


def test_a_mirror_variant_is_the_mirrored_image_and_its_crop_is_measured_in_it():
    rng = np.random.default_rng(0)
    resized = Image.fromarray(rng.integers(0, 255, (32, 48, 3), dtype=np.uint8))
    pixels, info = render_variant(resized, CropVariant(0, 3, flip=True), 32, 32)
    mirrored = resized.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    expected = image_to_pixels(mirrored.crop((13, 0, 45, 32)))  # 48 - 32 - 3 = 13
    assert torch.equal(pixels, expected) and info == {"crop_top_left": [0, 13], "flip": True}
    plain, plain_info = render_variant(resized, CropVariant(0, 3), 32, 32)
    assert torch.equal(plain, pixels.flip(-1)) and plain_info == {"crop_top_left": [0, 3], "flip": False}
    # the transform's own output is variant 0 of the same preparation
    canonical_pixels, canonical_info = ResizeCrop(32)(resized)
    prepared = ResizeCrop(32).prepare(resized)
    assert torch.equal(canonical_pixels, prepared.render(prepared.canonical)[0])
    assert canonical_info["crop_top_left"] == [0, 8] and "flip" not in canonical_info


def test_selection_leaves_out_mirror_images_or_crops():
    settings = VariantSettings(flip=True, crops_per_image=2)
    assert settings.selection() == [0, 1, 2, 3, 4, 5]
    assert settings.selection(random_flip=False) == [0, 2, 4]
    assert settings.selection(use_crops=False) == [0, 1]
    assert VariantSettings().selection() == [0] and not VariantSettings().enabled


def _sample(key: str, stored: int, meta_variants: list | None = None) -> LatentSample:
    """Variant v of the sample holds v everywhere (variant 0 is latent.npy)."""
    variants = np.arange(1, stored + 1, dtype=np.float32)[:, None, None, None] * np.ones(LATENT) if stored else None
    meta = {"original_size": [32, 48], "crop_top_left": [0, 8], "target_size": [32, 32]}
    if stored:
        meta["variants"] = meta_variants or [
            {"crop_top_left": [0, v], "flip": v % 2 == 1} for v in range(1, stored + 1)
        ]
    return LatentSample(key, np.zeros(LATENT), np.zeros((2, 4)), "c", meta, latent_variants=variants)


def test_the_variants_member_round_trips_and_is_checked_strictly():
    raw = encode_latent_sample(_sample("k", 3)) | {"__url__": "s.tar"}
    decoded = decode_latent_sample(raw, LATENT, (2, 4), latent_variants=3)
    assert decoded.latent_variants.dtype == np.float16 and decoded.latent_variants.shape == (3, *LATENT)
    assert decoded.latent_variants[:, 0, 0, 0].tolist() == [1, 2, 3]
    assert decode_latent_sample(raw, LATENT, (2, 4)).latent_variants is None  # a reader that wants none
    with pytest.raises(CorruptSampleError, match=r"s\.tar: sample k: member 'latent_variants\.npy' is float16 "):
        decode_latent_sample(raw, LATENT, (2, 4), latent_variants=5)
    old = encode_latent_sample(_sample("old", 0)) | {"__url__": "s.tar"}
    with pytest.raises(CorruptSampleError, match=r"'latent_variants\.npy' is missing \(a shard with image variants\)"):
        decode_latent_sample(old, LATENT, (2, 4), latent_variants=3)
    short = encode_latent_sample(_sample("k", 3, meta_variants=[{}])) | {"__url__": "s.tar"}
    with pytest.raises(CorruptSampleError, match=r"metadata 'variants' is .* expected a list of 3"):
        decode_latent_sample(short, LATENT, (2, 4), latent_variants=3)
    assert LATENT_VARIANTS_KEY not in old


def write_latent_folder(folder: Path, settings: VariantSettings | None, samples: int = 256, sdxl: bool = False) -> Path:
    """A latent-shard folder (2 shards) whose sample's variant v holds the value v."""
    stored = settings.count - 1 if settings else 0
    transforms = {"name": "resize_crop", **({VARIANTS_SETTING: settings.settings()} if settings else {})}
    folder.mkdir()
    shards = []
    for shard in range(2):
        with open_tar_writer(folder / f"s{shard}.tar") as writer:
            for i in range(samples // 2):
                sample = _sample(f"{shard}-{i:04d}", stored)
                if sdxl:
                    sample.pooled = np.zeros(3)
                writer.write(encode_latent_sample(sample))
        shards.append(ShardEntry(f"s{shard}.tar", samples // 2, f"/raw/s{shard}.tar", "00"))
    info = EncoderInfo(path="/m", class_name="X", fingerprint="ab")
    LatentManifest(
        32, list(LATENT), [2, 4], info, info, "/m/tok", transforms, shards=shards, pooled_shape=[3] if sdxl else []
    ).save(folder)
    save_uncond_embedding(folder, np.zeros((2, 4)))
    if sdxl:
        from data_pipelines.latents.format import save_uncond_pooled

        save_uncond_pooled(folder, np.zeros(3))
    return folder


def tensors(batch: dict) -> dict[str, torch.Tensor]:
    """A batch's arrays (not the keys webdataset passes along)."""
    return {k: v for k, v in batch.items() if not k.startswith("__")}


def drawn_epoch(folder: Path, skip_state: dict | None = None, batches: int | None = None, **options) -> list[dict]:
    """The batches of one training epoch as the module hands them to the step (variants drawn)."""
    module = LatentShardDataModule(str(folder), batch_size=32, num_workers=0, shuffle_buffer=64, seed=3, **options)
    module.trainer = SimpleNamespace(training=True, current_epoch=0)
    if skip_state is not None:
        module.load_state_dict(skip_state)
    out = []
    for batch in module.train_dataloader():
        out.append(tensors(module.on_before_batch_transfer(batch, 0)))
        if batches is not None and len(out) == batches:
            out.append(module.state_dict())
            break
    return out


def test_one_epoch_draws_every_variant_in_its_proportion(tmp_path):
    folder = write_latent_folder(tmp_path / "latents", VariantSettings(flip=True, crops_per_image=1))
    batches = drawn_epoch(folder)
    assert all(set(b) == {"latents", "text"} and b["latents"].shape == (32, *LATENT) for b in batches)
    drawn = torch.cat([b["latents"][:, 0, 0, 0] for b in batches]).long()
    counts = torch.bincount(drawn, minlength=4)
    assert counts.sum() == 256 and (counts - 64).abs().max() <= 20, counts  # 4 variants: 64 each, within 20
    no_flip = torch.cat([b["latents"][:, 0, 0, 0] for b in drawn_epoch(folder, random_flip=False)]).long()
    assert set(no_flip.tolist()) == {0, 2}, "random_flip=false never draws a mirror image"
    no_crops = torch.cat([b["latents"][:, 0, 0, 0] for b in drawn_epoch(folder, use_crop_variants=False)]).long()
    assert set(no_crops.tolist()) == {0, 1}


def test_a_resumed_stream_draws_bit_identical_batches(tmp_path):
    folder = write_latent_folder(tmp_path / "latents", VariantSettings(flip=True, crops_per_image=2))
    whole = drawn_epoch(folder)
    *first, state = drawn_epoch(folder, batches=3)  # interrupted after 3 of 8 batches
    resumed = drawn_epoch(folder, skip_state=state)
    assert len(first) + len(resumed) == len(whole) == 8
    for expected, got in zip(whole, first + resumed, strict=True):
        assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)


def test_sdxl_time_ids_follow_the_drawn_variant(tmp_path):
    folder = write_latent_folder(tmp_path / "latents", VariantSettings(flip=True, crops_per_image=1), 64, sdxl=True)
    (batch, *_) = drawn_epoch(folder)
    variant = batch["latents"][:, 0, 0, 0].long()
    expected_left = torch.where(variant == 0, 8, variant)  # variant v >= 1 was cropped at left = v
    assert torch.equal(batch["time_ids"][:, 3], expected_left) and batch["time_ids"].shape == (32, 6)
    assert len(set(variant.tolist())) > 1


def test_shards_without_variants_load_as_before(tmp_path):
    folder = write_latent_folder(tmp_path / "latents", None, 64)
    loader = LatentShardDataModule(str(folder), batch_size=32, num_workers=0, seed=3).train_dataloader()
    raw = tensors(next(iter(loader)))
    assert set(raw) == {"latents", "text"} and raw["latents"].shape == (32, *LATENT)
    only_canonical = write_latent_folder(tmp_path / "flip", VariantSettings(flip=True), 64)
    module = LatentShardDataModule(str(only_canonical), batch_size=32, num_workers=0, seed=3, random_flip=False)
    batch = tensors(next(iter(module.train_dataloader())))
    assert set(batch) == {"latents", "text"} and batch["latents"].abs().sum() == 0  # variant 0 only, no draw


def test_a_changed_variant_choice_starts_the_stream_afresh_and_older_checkpoints_still_resume(latent_dir, caplog):
    from data_pipelines.loading.datamodules import LatentShardDataModule

    def data(**settings):
        return LatentShardDataModule(str(latent_dir), batch_size=4, num_workers=0, **settings)

    saved = {**data().state_dict(), "batches": 5, "epoch_batches": 5}
    flipless = data(random_flip=False)
    flipless.load_state_dict(saved)
    assert flipless._batches == 0 and "random_flip True -> False" in caplog.text
    older = {k: v for k, v in saved.items() if k not in ("random_flip", "use_crop_variants")}  # before variants
    resumed = data()
    resumed.load_state_dict(older)
    assert resumed._batches == 5
