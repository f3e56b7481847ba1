"""data=images_online: per-step augmentation, and batches encoded on the device into what a latent shard gives."""

import numpy as np
import pytest
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from PIL import Image

from data_pipelines.transforms.step_augment import Augment
from lf_common.errors import ConfigError
from tests.conftest import compose_config


def online_overrides(raw_shards, pretrained_dir, tmp_path, *extra):
    return [
        "data=images_online",
        f"data.shards={raw_shards}",
        f"data.pretrained={pretrained_dir}",
        "data.resolution=32",
        "data.batch_size=8",
        "data.num_workers=0",
        "data.shuffle_buffer=16",
        f"output_dir={tmp_path}",
        *extra,
    ]


def gradient_image():
    array = np.zeros((4, 6, 3), dtype=np.uint8)
    array[..., 0] = np.arange(6) * 40  # red grows left to right
    array[..., 1] = 100
    return Image.fromarray(array)


def test_flip_mirrors_about_half_the_draws():
    image, augment = gradient_image(), Augment(random_flip=True)
    rng = np.random.default_rng(0)
    flipped = [np.asarray(augment(image, rng))[0, 0, 0] == 200 for _ in range(400)]
    assert 160 < sum(flipped) < 240  # p = 1/2
    assert not Augment().active and Augment()(image, rng) is image


def test_color_jitter_scales_brightness_within_its_strength():
    image = Image.fromarray(np.full((4, 4, 3), 100, dtype=np.uint8))  # grey: contrast and saturation leave it
    augment, rng = Augment(color_jitter=0.1), np.random.default_rng(0)
    means = [np.asarray(augment(image, rng)).mean() for _ in range(200)]
    assert 89 <= min(means) < 95 and 105 < max(means) <= 111  # 100 x U[0.9, 1.1], rounded
    assert Augment()(image, rng) is image
    with pytest.raises(ConfigError, match=r"data\.color_jitter=0\.8"):
        Augment(color_jitter=0.8)


def test_online_batches_are_what_precompute_stores(raw_shards, pretrained_dir, latent_dir, tmp_path):
    """Center crop, no augmentation: the batch encoded on the device equals the precomputed latents and text
    of the same digits (the same encoders, the same preprocessing)."""
    from data_pipelines.latents.format import LatentManifest

    cfg = compose_config("train", online_overrides(raw_shards, pretrained_dir, tmp_path, "data.crop=center",
                                                   "data.resampled=false", "data.shuffle_buffer=0"))  # fmt: skip
    data = instantiate(cfg.data)
    assert data.num_samples == 96
    raw = next(iter(data.train_dataloader()))
    assert raw["pixels"].shape == (8, 3, 32, 32) and len(raw["captions"]) == 8
    captions = list(raw["captions"])
    batch = data.on_after_batch_transfer(raw, 0)
    assert set(batch) >= {"latents", "text", "token_ids"} and "pixels" not in batch and "captions" not in batch
    ids, tokenizer = batch["token_ids"], data.encoders.tokenizer  # (B, 1, 8) int64: the ids text is encoded from
    assert ids.shape == (8, 1, 8) and ids.dtype == torch.int64 and data.token_ids
    assert [tokenizer.decode(row[0].tolist(), skip_special_tokens=True).strip() for row in ids] == captions
    with torch.no_grad():
        torch.testing.assert_close(data.encoders.text_encoder(ids[:, 0]).last_hidden_state, batch["text"])
    assert data.uncond_token_ids.shape == (1, 8) and data.uncond_token_ids_2 is None
    cached = LatentManifest.load(str(latent_dir))
    assert list(batch["latents"].shape[1:]) == cached.latent_shape == data.manifest.latent_shape
    assert list(batch["text"].shape[1:]) == cached.text_shape == list(data.uncond_text.shape)
    assert data.manifest.vae.fingerprint == cached.vae.fingerprint
    stored = instantiate(compose_config("train", [f"data.train_dir={latent_dir}", "data.num_workers=0",
                                                  "data.resampled=false", "data.shuffle_buffer=0", "data.batch_size=96",
                                                  "output_dir=o"]).data)  # fmt: skip
    everything = next(iter(stored.train_dataloader()))  # all 96 digits, in float16
    assert everything["latents"].shape[0] == 96
    for latents, text in zip(batch["latents"], batch["text"], strict=True):  # each online sample is a stored one
        nearest = (everything["latents"].float() - latents).flatten(1).abs().amax(1).argmin()
        assert torch.allclose(latents, everything["latents"][nearest].float(), atol=5e-3)
        assert torch.allclose(text, everything["text"][nearest].float(), atol=5e-3)
    assert torch.allclose(batch["text"], data.encoders.encode_captions(captions))


def test_skip_text_runs_no_frozen_text_encoder_in_the_step(raw_shards, pretrained_dir, tmp_path):
    """``model.train_text_encoder=true`` (``data.skip_text``): the step encodes the ids with the encoder it trains."""
    cfg = compose_config("train", online_overrides(raw_shards, pretrained_dir, tmp_path, "data.crop=center",
                                                   "model.train_text_encoder=true"))  # fmt: skip
    data = instantiate(cfg.data)
    calls = []
    data.encoders.text_encoder.register_forward_hook(lambda *_: calls.append(1))
    raw = next(iter(data.train_dataloader()))
    captions = list(raw["captions"])
    batch = data.on_after_batch_transfer(raw, 0)
    assert "text" not in batch and not calls
    assert batch["latents"].shape == (8, 4, 8, 8)
    assert torch.equal(batch["token_ids"], data.encoders.token_ids(captions)[0])


def test_random_augmentation_changes_what_each_step_sees(raw_shards, pretrained_dir, tmp_path):
    seen = []

    def tagging(caption, rng):
        seen.append(caption)
        return f"{caption}, tag{int(rng.integers(3))}"

    cfg = compose_config("train", online_overrides(raw_shards, pretrained_dir, tmp_path, "data.random_flip=true",
                                                   "data.color_jitter=0.1", "data.resampled=false",
                                                   "data.shuffle_buffer=0"))  # fmt: skip
    first = instantiate(cfg.data, caption_transform=tagging)
    second = instantiate(cfg.data)
    a, b = next(iter(first.train_dataloader())), next(iter(second.train_dataloader()))
    assert [c.rsplit(", tag", 1)[0] for c in a["captions"]] == b["captions"] == seen[:8]
    assert all(", tag" in c for c in a["captions"])
    # The same seed draws the same augmentation of the first sample (the caption transform draws after it).
    assert torch.equal(a["pixels"][0], b["pixels"][0])
    plain = instantiate(compose_config("train", online_overrides(raw_shards, pretrained_dir, tmp_path,
                                       "data.resampled=false", "data.shuffle_buffer=0")).data)  # fmt: skip
    unaugmented = next(iter(plain.train_dataloader()))["pixels"]
    assert not torch.equal(unaugmented, b["pixels"]), "flip and jitter change the pixels"


def test_sdxl_folder_is_refused_in_one_line(raw_shards, sdxl_pretrained_dir, tmp_path):
    second = [f"+data.encoders.text_encoder_2_path={sdxl_pretrained_dir}/text_encoder_2",
              f"+data.encoders.tokenizer_2_path={sdxl_pretrained_dir}/tokenizer_2"]  # fmt: skip
    cfg = compose_config("train", online_overrides(raw_shards, sdxl_pretrained_dir, tmp_path, *second))
    with pytest.raises(InstantiationException, match=r"SDXL folder needs pooled text .* precompute it"):
        instantiate(cfg.data)  # the entry points print the ConfigError's one line


def test_tag_tricks_are_drawn_every_step_from_the_caption_keys(raw_shards, pretrained_dir, tmp_path):
    import numpy as np

    from data_pipelines.transforms.captions import StepCaptionTricks

    tricks = StepCaptionTricks(shuffle_tags=True, keep_tokens=1, tag_dropout=0.2, prefix="sks")
    rng = np.random.default_rng(0)
    caption = "1girl, solo, red hair, smile, outdoors, hat"
    drawn = [tricks(caption, rng) for _ in range(50)]
    assert all(d.startswith("sks, 1girl, ") for d in drawn)  # the trigger, then the kept tag
    assert all(set(d.split(", ")[2:]) <= set(caption.split(", ")[1:]) for d in drawn)
    assert len(set(drawn)) > 20 and any(len(d.split(", ")) < 7 for d in drawn)  # shuffled, some tags dropped
    overrides = online_overrides(raw_shards, pretrained_dir, tmp_path, "data.resampled=false", "data.shuffle_buffer=0")
    cfg = compose_config("train", [*overrides, "data.captions={prefix: sks}"])
    batch = next(iter(instantiate(cfg.data).train_dataloader()))
    assert all(c.startswith("sks, ") for c in batch["captions"])
