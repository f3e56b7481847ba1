"""Token ids -> conditioning (``encode_token_ids``, SDXL's ``encode_token_ids_sdxl``): what the training step runs
on the shards' ``token_ids`` equals what precompute stores for the same captions (one recipe), and equals the
encoders' own outputs read as diffusers' pipelines and kohya read them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from data_pipelines.latents.encoders import encode_text
from data_pipelines.latents.sdxl_text import encode_text_sdxl, encode_token_ids_sdxl
from data_pipelines.latents.text_encoding import TextEncoding, chunked_token_ids, encode_token_ids
from trainer.tiny_models.tiny_sdxl_text_encoders import save_tiny_sdxl_text_encoders

CAPTIONS = ["a handwritten digit 7", ", ".join(f"a {c} digit" for c in ["red", "blue", "green"] * 14)]  # short, long


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SDXL's tiny pair (its first encoder and tokenizer are SD 1.x's tiny CLIP, 77 tokens)."""
    return save_tiny_sdxl_text_encoders(tmp_path_factory.mktemp("token_ids"), max_length=77)


def _load(folder: Path, suffix: str = "") -> tuple[CLIPTokenizer, torch.nn.Module]:
    cls = CLIPTextModelWithProjection if suffix else CLIPTextModel
    tokenizer = CLIPTokenizer.from_pretrained(folder / f"tokenizer{suffix}")
    return tokenizer, cls.from_pretrained(folder / f"text_encoder{suffix}")


ENCODINGS = [TextEncoding(), TextEncoding(clip_skip=2), TextEncoding(150), TextEncoding(225, 3)]


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_ids_encode_to_what_precompute_stores(folder: Path, encoding: TextEncoding):
    tokenizer, encoder = _load(folder)
    ids = chunked_token_ids(tokenizer, CAPTIONS, encoding.chunks)  # (B, n, 77), as the shards keep them
    with torch.no_grad():
        ours = encode_token_ids(encoder, ids, encoding)
    assert ours.shape == (2, encoding.max_token_length + 2, 32)
    assert torch.equal(ours, encode_text(tokenizer, encoder, CAPTIONS, encoding))  # precompute's recipe


def test_one_chunk_is_the_encoders_plain_output_and_clip_skip_its_normed_earlier_layer(folder: Path):
    tokenizer, encoder = _load(folder)
    plain = tokenizer(CAPTIONS, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        output = encoder(plain, output_hidden_states=True)
        ids = plain[:, None]  # (B, 1, 77)
        assert torch.equal(encode_token_ids(encoder, ids), output.last_hidden_state)
        skipped = getattr(encoder, "text_model", encoder).final_layer_norm(output.hidden_states[-2])
        assert torch.equal(encode_token_ids(encoder, ids, TextEncoding(clip_skip=2)), skipped)


def test_two_chunks_join_as_kohya(folder: Path):
    """First BOS state, each chunk's 75 inner states, the last chunk's final state."""
    tokenizer, encoder = _load(folder)
    ids = chunked_token_ids(tokenizer, CAPTIONS, 2)
    with torch.no_grad():
        first, second = (encoder(ids[:, i]).last_hidden_state for i in range(2))  # (B, 77, D) each
        expected = torch.cat([first[:, :1], first[:, 1:-1], second[:, 1:-1], second[:, -1:]], dim=1)
        assert torch.equal(encode_token_ids(encoder, ids, TextEncoding(150)), expected)


@pytest.mark.parametrize("max_token_length", [75, 150])
def test_sdxl_ids_encode_to_what_precompute_stores(folder: Path, max_token_length: int):
    (tokenizer, encoder), (tokenizer_2, encoder_2) = _load(folder), _load(folder, "_2")
    encoding = TextEncoding(max_token_length)
    ids = chunked_token_ids(tokenizer, CAPTIONS, encoding.chunks)
    ids_2 = chunked_token_ids(tokenizer_2, CAPTIONS, encoding.chunks)
    assert not torch.equal(ids, ids_2)  # the second tokenizer pads with "!": the two id sets differ
    with torch.no_grad():
        text, pooled = encode_token_ids_sdxl([encoder, encoder_2], ids, ids_2, encoding)
        stored_text, stored_pooled = encode_text_sdxl([tokenizer, tokenizer_2], [encoder, encoder_2], CAPTIONS, None,
                                                      encoding)  # fmt: skip
        penultimate = [e(i[:, 0], output_hidden_states=True) for e, i in ((encoder, ids), (encoder_2, ids_2))]
    assert torch.equal(text, stored_text) and torch.equal(pooled, stored_pooled)
    assert text.shape == (2, max_token_length + 2, 64) and pooled.shape == (2, 32)
    assert torch.equal(pooled, penultimate[1].text_embeds)  # the first chunk's projection, encoder 2's
    first_chunk = torch.cat([out.hidden_states[-2] for out in penultimate], dim=-1)  # (B, 77, 64)
    assert torch.equal(text[:, :76], first_chunk[:, :76])
