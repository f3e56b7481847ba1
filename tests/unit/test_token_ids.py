"""Token ids in latent shards (``lf-precompute keep_token_ids=true``): each sample keeps the ids of exactly the
caption it encoded (prefix and tag tricks included, every caption variant, SDXL's two tokenizers), the empty
caption's ids lie beside ``uncond.text.npy``, and the data modules batch the ids with the variant of ``text``
they were encoded into."""

from __future__ import annotations

import io
import random
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from data_pipelines.latents.format import (
    TOKEN_IDS_KEY,
    LatentManifest,
    LatentSample,
    decode_latent_sample,
    encode_latent_sample,
    load_uncond_token_ids,
)
from data_pipelines.latents.format.samples import npy_bytes
from data_pipelines.latents.precompute import StaleLatentsError
from data_pipelines.loading.datamodules import LatentShardDataModule
from data_pipelines.loading.mixed import MixedLatentDataModule
from data_pipelines.raw.sources.base import SourceItem
from data_pipelines.raw.writer import write_raw_shards
from lf_common.errors import ConfigError, CorruptSampleError, DataError
from tests.conftest import save_tiny_vae
from trainer.cli.hydra_app import compose_config
from trainer.cli.precompute import run_precompute
from trainer.tiny_models.tiny_sdxl_text_encoders import save_tiny_sdxl_text_encoders
from trainer.tiny_models.tiny_text_encoder import save_tiny_text_encoder

TAGS = ["cat", "dog", "red", "blue", "tree", "house", "car", "sky", "sun", "moon", "bird", "fish"]  # one token each
VARIANTS = 3
SAMPLES = 16
LOADER = {"batch_size": 8, "num_workers": 0, "shuffle_buffer": 0, "seed": 1}


def _png(value: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((32, 32, 3), value, dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Raw shards of 16 grey squares captioned with 6 tags each (two shards), and a 77-token tiny CLIP."""
    root = tmp_path_factory.mktemp("token_ids")
    items = (SourceItem(f"item{i}", _png(i * 15), ", ".join(random.Random(i).sample(TAGS, 6))) for i in range(SAMPLES))
    write_raw_shards(items, root / "raw", samples_per_shard=SAMPLES // 2)
    save_tiny_text_encoder(root / "sd", max_length=77)  # the shared fixture's CLIP holds 8 tokens: too few here
    save_tiny_vae(root / "sd")
    return root


def precompute(root: Path, pretrained: Path, out: str, *extra: str) -> Path:
    overrides = [f"shards={root / 'raw'}", f"out_dir={root / out}", f"pretrained={pretrained}", "resolution=32"]
    run_precompute(compose_config("precompute", [*overrides, "batch_size=16", "num_workers=0", *extra]))
    return root / out


TRICKS = (
    f"captions.variants={VARIANTS}",
    "captions.shuffle_tags=true",
    "captions.keep_tokens=1",
    "captions.prefix=sks",
)


@pytest.fixture(scope="module")
def id_latents(root: Path) -> Path:
    """Latents with token ids, three caption variants each: a trigger first, the first tag kept, the rest shuffled."""
    return precompute(root, root / "sd", "with_ids", "keep_token_ids=true", *TRICKS)


def samples_of(folder: Path) -> list[LatentSample]:
    manifest = LatentManifest.load(folder)
    raw = list(wds.WebDataset(manifest.shard_paths(folder), shardshuffle=False))
    return [
        decode_latent_sample(
            sample,
            text_shape=tuple(manifest.text_shape),
            pooled_shape=tuple(manifest.pooled_shape) if manifest.sdxl else None,
            caption_variants=manifest.caption_variants,
            token_ids_shape=tuple(manifest.token_ids_shape),
        )
        for sample in raw
    ]


def decoded(tokenizer: CLIPTokenizer, ids: np.ndarray) -> str:
    """The caption of one chunk's ids ``(L,)``, as written (CLIP's decoding spaces out the commas)."""
    return " ".join(tokenizer.decode(ids.tolist(), skip_special_tokens=True).replace(" ,", ",").split())


def test_the_stored_ids_are_the_encoded_captions_and_give_the_stored_text(id_latents: Path, root: Path):
    manifest = LatentManifest.load(id_latents)
    assert manifest.token_ids and manifest.token_ids_shape == [1, 77] and manifest.transforms["token_ids"] is True
    tokenizer = CLIPTokenizer.from_pretrained(root / "sd" / "tokenizer")
    encoder = CLIPTextModel.from_pretrained(root / "sd" / "text_encoder").eval()
    samples = samples_of(id_latents)
    assert len(samples) == SAMPLES
    shuffled = 0
    for sample in samples:
        captions = sample.meta["caption_variants"]
        ids = sample.token_ids_variants  # (K, 1, 77) int32
        assert sample.token_ids.dtype == np.int32 and ids.shape == (VARIANTS, 1, 77)
        assert np.array_equal(ids[0], sample.token_ids) and captions[0] == sample.caption
        assert [decoded(tokenizer, chunk[0]) for chunk in ids] == captions  # prefix and shuffled tags included
        assert all(c.startswith("sks, ") for c in captions)
        shuffled += sum(not np.array_equal(ids[k], ids[0]) for k in range(1, VARIANTS))
        with torch.no_grad():  # the frozen encoder's recipe (one chunk, the last layer) on the stored ids
            states = encoder(torch.tensor(ids[:, 0], dtype=torch.long)).last_hidden_state  # (K, 77, D)
        torch.testing.assert_close(
            states, torch.tensor(sample.text_variants, dtype=torch.float32), rtol=1e-2, atol=1e-2
        )
    assert shuffled > SAMPLES  # most variants are other orders: the check above tells them apart
    uncond, uncond_2 = load_uncond_token_ids(id_latents, manifest)
    assert uncond.dtype == np.int32 and uncond.shape == (1, 77) and uncond_2 is None
    assert uncond[0, 0] == tokenizer.bos_token_id and decoded(tokenizer, uncond[0]) == ""


def test_the_data_module_draws_the_ids_of_the_text_variant_it_draws(id_latents: Path):
    data = LatentShardDataModule(str(id_latents), resampled=False, **LOADER)
    assert data.token_ids and data.uncond_token_ids_2 is None
    assert data.uncond_token_ids.dtype == torch.int64 and data.uncond_token_ids.shape == (1, 77)
    data.trainer = SimpleNamespace(training=True, current_epoch=0)
    other_than_first = 0
    for batch in data.train_dataloader():
        ids, texts = batch["token_ids_variants"].clone(), batch["text_variants"].clone()  # (B, K, 1, 77), (B, K, T, D)
        assert ids.dtype == torch.int64
        drawn = data.on_before_batch_transfer(batch, 0)
        assert "token_ids_variants" not in drawn and drawn["token_ids"].shape == (8, 1, 77)
        for row in range(ids.shape[0]):
            by_ids = {k for k in range(VARIANTS) if torch.equal(ids[row, k], drawn["token_ids"][row])}
            by_text = {k for k in range(VARIANTS) if torch.equal(texts[row, k], drawn["text"][row])}
            assert by_ids and by_ids == by_text  # the ids of the text drawn
            other_than_first += 0 not in by_ids
    assert other_than_first > 0


def test_a_sample_missing_its_ids_or_holding_other_ones_is_corrupt():
    latent, text = np.zeros((4, 4, 4), np.float16), np.zeros((77, 32), np.float16)
    ids = np.arange(77, dtype=np.int32)[None]  # (1, 77)
    members = encode_latent_sample(LatentSample("k", latent, text, "c", {}, token_ids=ids))
    read = decode_latent_sample({**members, "__url__": "s.tar"}, text_shape=(77, 32), token_ids_shape=(1, 77))
    assert np.array_equal(read.token_ids, ids) and read.token_ids.dtype == np.int32
    stripped = {key: value for key, value in members.items() if key != TOKEN_IDS_KEY}
    with pytest.raises(CorruptSampleError, match=r"s\.tar: sample k: member 'token_ids\.npy' is missing"):
        decode_latent_sample({**stripped, "__url__": "s.tar"}, token_ids_shape=(1, 77))
    as_floats = {**members, TOKEN_IDS_KEY: npy_bytes(ids), "__url__": "s.tar"}  # the storage dtype, float16
    with pytest.raises(CorruptSampleError, match=r"'token_ids\.npy' is float16 \(1, 77\), expected int32 \(1, 77\)"):
        decode_latent_sample(as_floats, token_ids_shape=(1, 77))


def test_mixed_folders_all_hold_ids_or_the_one_without_is_named(id_latents: Path, root: Path):
    plain = precompute(root, root / "sd", "without_ids")
    assert not LatentManifest.load(plain).token_ids
    with pytest.raises(
        DataError, match=r"data\.datasets\[1\] \(.*without_ids\) holds no token ids.*keep_token_ids=true"
    ):
        MixedLatentDataModule([{"path": str(id_latents)}, {"path": str(plain)}], **LOADER)
    with pytest.raises(StaleLatentsError, match=r"transform token_ids \(None -> True\) changed"):
        precompute(root, root / "sd", "without_ids", "keep_token_ids=true")  # shards without ids are stale
    second = shutil.copytree(id_latents, root / "with_ids_copy")
    data = MixedLatentDataModule([{"path": str(id_latents)}, {"path": str(second)}], **LOADER)
    assert data.token_ids and data.uncond_token_ids.shape == (1, 77)
    data.trainer = SimpleNamespace(training=True, current_epoch=0)
    batch = data.on_before_batch_transfer(next(iter(data.train_dataloader())), 0)
    assert batch["token_ids"].shape == (8, 1, 77) and batch["token_ids"].dtype == torch.int64


def test_sdxl_shards_hold_both_tokenizers_ids_for_their_two_encoders(root: Path):
    pretrained = root / "xl"
    save_tiny_sdxl_text_encoders(pretrained, max_length=77)
    save_tiny_vae(pretrained)
    out = precompute(
        root, pretrained, "xl_ids", "keep_token_ids=true", "captions.variants=2", "captions.shuffle_tags=true"
    )
    manifest = LatentManifest.load(out)
    assert manifest.sdxl and manifest.uncond_token_ids_2_file == "uncond.token_ids_2.npy"
    tokenizer_2 = CLIPTokenizer.from_pretrained(pretrained / "tokenizer_2")
    encoders = (
        CLIPTextModel.from_pretrained(pretrained / "text_encoder").eval(),
        CLIPTextModelWithProjection.from_pretrained(pretrained / "text_encoder_2").eval(),
    )
    for sample in samples_of(out)[:4]:
        ids, ids_2 = sample.token_ids_variants[:, 0], sample.token_ids_2_variants[:, 0]  # (2, 77) each
        assert np.array_equal(ids_2[0], sample.token_ids_2[0])
        assert [decoded(tokenizer_2, chunk) for chunk in ids_2] == sample.meta["caption_variants"]
        assert (ids_2 == 0).any() and not (ids == 0).any()  # the second tokenizer pads with "!" (id 0)
        with torch.no_grad():  # SDXL's recipe: both penultimate states, concatenated
            states = [e(torch.tensor(i, dtype=torch.long), output_hidden_states=True).hidden_states[-2] for e, i in zip(
                encoders, (ids, ids_2), strict=True)]  # fmt: skip
        stored = torch.tensor(sample.text_variants, dtype=torch.float32)
        torch.testing.assert_close(torch.cat(states, dim=-1), stored, rtol=1e-2, atol=1e-2)
    data = LatentShardDataModule(str(out), resampled=False, **LOADER)
    assert data.uncond_token_ids_2.shape == (1, 77) and not torch.equal(data.uncond_token_ids_2, data.uncond_token_ids)
    data.trainer = SimpleNamespace(training=True, current_epoch=0)
    batch = data.on_before_batch_transfer(next(iter(data.train_dataloader())), 0)
    assert batch["token_ids_2"].shape == (8, 1, 77) and batch["pooled"].shape[0] == 8


def batch_bytes(batch: dict) -> int:
    return sum(value.nbytes for value in batch.values() if isinstance(value, torch.Tensor))


def test_skip_text_batches_the_same_ids_and_latents_without_the_text(id_latents: Path, root: Path):
    """``data.skip_text`` (``model.train_text_encoder=true``): the step encodes the ids, so no ``text`` is batched;
    the rest of each batch, the drawn caption variant included, is what it would have been."""
    full, lean = (
        LatentShardDataModule(str(id_latents), val_dir=str(id_latents), resampled=False, skip_text=skip, **LOADER)
        for skip in (False, True)
    )
    sizes = []
    for data in (full, lean):
        data.trainer = SimpleNamespace(training=True, current_epoch=0)
    for a, b in zip(full.train_dataloader(), lean.train_dataloader(), strict=True):
        a, b = full.on_before_batch_transfer(a, 0), lean.on_before_batch_transfer(b, 0)
        assert set(a) - set(b) == {"text"} and set(b) <= set(a)
        assert all(torch.equal(a[k], b[k]) if isinstance(b[k], torch.Tensor) else a[k] == b[k] for k in b)
        sizes.append((batch_bytes(a), batch_bytes(b)))
    assert sizes and all(lean_bytes < full_bytes for full_bytes, lean_bytes in sizes)
    lean.trainer = SimpleNamespace(training=False, current_epoch=0)
    validation = lean.on_before_batch_transfer(next(iter(lean.val_dataloader())), 0)
    assert "text" not in validation and validation["token_ids"].shape[1:] == (1, 77)
    plain = precompute(root, root / "sd", "without_ids")
    with pytest.raises(ConfigError, match="keep_token_ids=true"):
        LatentShardDataModule(str(plain), skip_text=True, **LOADER)


@pytest.mark.parametrize("data", ["latents", "mixed", "images_online"])
def test_skip_text_follows_train_text_encoder(data: str):
    for train in (False, True):
        cfg = compose_config("train", [f"data={data}", f"model.train_text_encoder={str(train).lower()}"])
        assert cfg.data.skip_text is train
