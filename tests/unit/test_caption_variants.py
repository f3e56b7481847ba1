"""Caption variants: kohya-style tag tricks as pure functions, stored by precompute, drawn one per step."""

from __future__ import annotations

import io
import random
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from data_pipelines.latents.format import LatentManifest, decode_latent_sample
from data_pipelines.raw.captions import sample_captions
from data_pipelines.raw.sources.base import SourceItem
from data_pipelines.raw.writer import write_raw_shards
from data_pipelines.transforms.captions import CaptionSettings, caption_variant, caption_variants
from lf_common.errors import ConfigError, CorruptSampleError
from trainer.cli.hydra_app import compose_config

TAGS = ["cat", "dog", "red", "blue", "tree", "house", "car", "sky", "sun", "moon", "bird", "fish"]  # one token each
VARIANTS = 4


def test_shuffle_keeps_the_first_keep_tokens_and_dropout_leaves_a_subset_of_the_tags():
    settings = CaptionSettings(variants=8, shuffle_tags=True, keep_tokens=2, tag_dropout=0.3)
    caption = ", ".join(TAGS)
    variants = caption_variants("000000007", [caption], settings)
    assert variants[0] == caption  # the canonical variant: neither shuffled nor dropped
    orders = set()
    for variant in variants[1:]:
        tags = variant.split(", ")
        assert tags[:2] == TAGS[:2]
        assert set(tags) <= set(TAGS) and len(tags) == len(set(tags))
        orders.add(tuple(tags))
    assert len(orders) > 1
    assert any(len(v.split(", ")) < len(TAGS) for v in variants[1:])  # some tags dropped at 0.3
    assert caption_variants("000000007", [caption], settings) == variants  # seeded per sample key
    assert caption_variants("000000008", [caption], settings) != variants


def test_keep_tokens_separator_prefix_and_several_captions():
    settings = CaptionSettings(variants=6, shuffle_tags=True, keep_tokens_separator="|||", prefix="sks")
    caption = "1girl, solo ||| red hair, smile, hat, outdoors, sky ||| masterpiece"
    for index in range(6):
        rng = random.Random(index)
        tags = caption_variant(caption, settings, rng).split(", ")
        assert tags[:3] == ["sks", "1girl", "solo"] and tags[-1] == "masterpiece"
        assert sorted(tags[3:-1]) == sorted(["red hair", "smile", "hat", "outdoors", "sky"])
    plain = CaptionSettings(variants=3)
    assert caption_variants("k", ["a cat", "a photo of a cat"], plain) == ["a cat", "a photo of a cat", "a cat"]
    assert sample_captions("a cat\n\n a photo of a cat \n", {}) == ["a cat", "a photo of a cat"]
    assert sample_captions("ignored", {"captions": ["x", "y"]}) == ["x", "y"]
    with pytest.raises(CorruptSampleError, match="'captions'"):
        sample_captions("c", {"captions": "not a list"})
    with pytest.raises(ConfigError, match="tag_dropout"):
        CaptionSettings(tag_dropout=1.5)


def _png(value: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((32, 32, 3), value, dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def _items(count: int):
    for index in range(count):
        tags = ", ".join(random.Random(index).sample(TAGS, 8))
        if index % 8 == 0:  # a JSON list of captions in KEY.json
            yield SourceItem(f"item{index}", _png(index), tags, {"captions": [tags, "a plain sentence"]})
        else:
            yield SourceItem(f"item{index}", _png(index), tags)


@pytest.fixture(scope="module")
def variant_latents(tmp_path_factory: pytest.TempPathFactory, pretrained_dir: Path) -> Path:
    from trainer.cli.precompute import run_precompute

    root = tmp_path_factory.mktemp("caption_variants")
    write_raw_shards(_items(128), root / "raw", samples_per_shard=64)
    overrides = [
        f"shards={root / 'raw'}", f"out_dir={root / 'latents'}", f"pretrained={pretrained_dir}", "resolution=32",
        "batch_size=64", "num_workers=0", f"captions.variants={VARIANTS}", "captions.shuffle_tags=true",
        "captions.keep_tokens=1", "captions.tag_dropout=0.2",
    ]  # fmt: skip
    run_precompute(compose_config("precompute", overrides))
    return root / "latents"


def test_precompute_stores_the_variants_and_text_npy_stays_the_canonical_caption(variant_latents: Path):
    manifest = LatentManifest.load(variant_latents)
    assert manifest.caption_variants == VARIANTS
    assert manifest.transforms["captions"]["tag_dropout"] == 0.2  # in the cache key
    text_shape = tuple(manifest.text_shape)
    samples = list(wds.WebDataset(manifest.shard_paths(variant_latents), shardshuffle=False))
    assert len(samples) == 128
    for raw in samples[:16]:
        sample = decode_latent_sample(raw, text_shape=text_shape, caption_variants=VARIANTS)
        captions = sample.meta["caption_variants"]
        assert sample.text_variants.shape == (VARIANTS, *text_shape)
        assert np.array_equal(sample.text_variants[0], sample.text) and captions[0] == sample.caption
        first = captions[0].split(", ")[0]
        assert all(c.split(", ")[0] == first for c in captions if c != "a plain sentence")
    json_listed = decode_latent_sample(samples[0], text_shape=text_shape, caption_variants=VARIANTS)
    assert json_listed.meta["caption_variants"][1] == "a plain sentence"  # variant 1: the second caption
    stripped = {k: v for k, v in samples[1].items() if k != "text_variants.npy"}
    with pytest.raises(CorruptSampleError, match=r"text_variants\.npy' is missing"):
        decode_latent_sample(stripped, text_shape=text_shape, caption_variants=VARIANTS)


def test_training_draws_every_variant_about_equally_over_one_seeded_epoch(variant_latents: Path):
    from data_pipelines.loading.datamodules import LatentShardDataModule

    def one_epoch(seed: int) -> list[int]:
        data = LatentShardDataModule(
            str(variant_latents), batch_size=16, num_workers=0, shuffle_buffer=0, resampled=False, seed=seed
        )
        data.trainer = SimpleNamespace(training=True, current_epoch=0)
        drawn = []
        for batch in data.train_dataloader():
            stored = batch["text_variants"].clone()  # (B, K, T, D)
            text = data.on_before_batch_transfer(batch, 0)["text"]  # (B, T, D)
            assert "text_variants" not in batch and text.shape == stored[:, 0].shape
            for row, variants in zip(text, stored, strict=True):
                same = [k for k in range(VARIANTS) if torch.equal(variants[k], row)]
                assert same, "the drawn text is none of the sample's variants"
                if len(same) == 1:
                    drawn.append(same[0])
        return drawn

    drawn = one_epoch(seed=0)
    counts = Counter(drawn)
    assert len(drawn) > 110 and set(counts) == set(range(VARIANTS))  # (variants rarely coincide: told apart)
    expected = len(drawn) / VARIANTS
    assert all(abs(counts[k] - expected) < 0.5 * expected for k in range(VARIANTS)), counts
    assert one_epoch(seed=0) == drawn  # seeded: a rerun draws the same


def test_a_caption_table_lists_its_extra_caption_columns_in_the_metadata(tmp_path: Path):
    from data_pipelines.raw.sources.caption_table import CaptionTableSource

    (tmp_path / "a.png").write_bytes(_png(7))
    (tmp_path / "t.csv").write_text("path,caption,short,tags\na.png,a grey square,square,\n", encoding="utf-8")
    (item,) = CaptionTableSource(str(tmp_path / "t.csv"), extra_caption_columns=["short", "tags"])
    assert item.caption == "a grey square"
    assert sample_captions(item.caption, item.meta) == ["a grey square", "square"]  # the empty cell left out
