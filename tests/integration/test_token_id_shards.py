"""The digits precomputed with ``keep_token_ids=true``: every sample's ids spell its caption and encode to its
stored text, a precompute cut short resumes to the same bytes, and ``lf-train`` trains on the shards as on any."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from transformers import CLIPTextModel, CLIPTokenizer

from data_pipelines.latents.format import (
    ENTRY_SUFFIX,
    UNCOND_TOKEN_IDS_NAME,
    LatentManifest,
    decode_latent_sample,
)
from tests.conftest import NUM_DIGITS, compose_config, precompute_digits, tiny_train_overrides
from trainer.cli.train import run_train

pytestmark = pytest.mark.slow


def test_digit_ids_spell_their_captions_resume_and_train(
    raw_shards: Path, pretrained_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
):
    out = tmp_path / "latents"
    precompute_digits(raw_shards, pretrained_dir, out, "keep_token_ids=true")
    assert "text [8, 32], token ids [1, 8] ->" in capsys.readouterr().out
    manifest = LatentManifest.load(out)
    assert manifest.token_ids and manifest.token_ids_shape == [1, 8]  # the fixture's CLIP: 8 tokens
    tokenizer = CLIPTokenizer.from_pretrained(pretrained_dir / "tokenizer")
    encoder = CLIPTextModel.from_pretrained(pretrained_dir / "text_encoder").eval()
    raw = list(wds.WebDataset(manifest.shard_paths(out), shardshuffle=False))
    samples = [decode_latent_sample(s, text_shape=tuple(manifest.text_shape), token_ids_shape=(1, 8)) for s in raw]
    assert len(samples) == NUM_DIGITS
    for sample in samples:  # "a handwritten digit seven": 6 tokens between BOS and EOS
        assert tokenizer.decode(sample.token_ids[0].tolist(), skip_special_tokens=True).strip() == sample.caption
    ids = torch.tensor(np.stack([s.token_ids[0] for s in samples]), dtype=torch.long)  # (96, 8)
    with torch.no_grad():
        states = encoder(ids).last_hidden_state  # (96, 8, D)
    stored = torch.tensor(np.stack([s.text for s in samples]), dtype=torch.float32)
    torch.testing.assert_close(states, stored, rtol=1e-2, atol=1e-2)

    # A run cut short: one shard never finished (its partial file left behind, no record), the ids file gone.
    digests = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in out.glob("*.tar")}
    cut = sorted(out.glob("*.tar"))[-1]
    cut.rename(cut.with_name(cut.name + ".tmp"))
    cut.with_name(cut.name.removesuffix(".tar") + ENTRY_SUFFIX).unlink()
    (out / UNCOND_TOKEN_IDS_NAME).unlink()
    precompute_digits(raw_shards, pretrained_dir, out, "keep_token_ids=true")
    assert {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in out.glob("*.tar")} == digests
    assert not list(out.glob("*.tmp")) and (out / UNCOND_TOKEN_IDS_NAME).is_file()

    metrics = run_train(compose_config("train", tiny_train_overrides(out, tmp_path / "run", steps=2)))
    assert metrics["global_step"] == 2 and np.isfinite(metrics["train/loss"])  # the ids ride along unused
