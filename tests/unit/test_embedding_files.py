"""Textual-inversion files: the layouts AUTOMATIC1111, ComfyUI and diffusers read, the tokens and prompts of
multi-vector embeddings, the trainable rows, and pickled embeddings read without running code.

The key names are checked against the rules of the programs' own loaders:

* AUTOMATIC1111, ``modules/textual_inversion/textual_inversion.py`` (``EmbeddingDatabase.load_from_file``): a
  ``.safetensors`` with ``clip_g`` and ``clip_l`` is an SDXL embedding; otherwise the file must hold exactly one
  tensor ("embedding file has multiple terms in it"), and the token is the file's name.
* ComfyUI, ``comfy/sd1_clip.py`` (``load_embed``): ``embed[embedding_key]`` when the key is present (``clip_l``
  for SD 1.x's and SDXL's first tokenizer, ``clip_g`` for SDXL's second), else the first value.
* diffusers, ``loaders/textual_inversion.py`` (``_retrieve_tokens_and_embeddings``): one key, the token.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from data_pipelines.latents.tokenizer import build_clip_tokenizer
from lf_common.errors import DataError
from trainer.interop.embedding_files import (
    Embedding,
    expand_prompt,
    read_embedding_file,
    save_embedding_files,
    vector_tokens,
)
from trainer.textual_inversion.new_tokens import NewTokenEmbedding


def a1111_reads(path: Path) -> tuple[str, list[torch.Tensor]]:
    """AUTOMATIC1111's rule for a ``.safetensors`` embedding (see the module docstring)."""
    data = load_file(path)
    if "clip_g" in data and "clip_l" in data:
        return path.stem, [data["clip_l"], data["clip_g"]]
    assert len(data) == 1, "embedding file has multiple terms in it"
    return path.stem, [next(iter(data.values()))]


def comfyui_reads(path: Path, embedding_key: str) -> torch.Tensor:
    """ComfyUI's ``load_embed`` for a ``.safetensors`` file and a tokenizer's ``embedding_key``."""
    data = load_file(path)
    return data[embedding_key] if embedding_key in data else next(iter(data.values()))


@pytest.mark.parametrize("widths", [[32], [32, 48]], ids=["sd", "sdxl"])
def test_files_hold_the_keys_each_ui_reads(tmp_path, widths):
    vectors = [torch.randn(3, w) for w in widths]
    files = save_embedding_files(tmp_path, Embedding("<d7>", vectors))
    ui, diffusers = files[0], files[1:]
    assert ui.name == "d7.safetensors"  # angle brackets are no file-name characters; the token rides in metadata
    name, read = a1111_reads(ui)
    assert name == "d7" and all(torch.equal(a, b) for a, b in zip(read, vectors, strict=True))
    keys = ["clip_l", "clip_g"] if len(widths) == 2 else ["emb_params"]
    assert sorted(load_file(ui)) == sorted(keys)
    for key, vector in zip(["clip_l", "clip_g"], vectors, strict=False):
        assert torch.equal(comfyui_reads(ui, key), vector)
    for file, vector in zip(diffusers, vectors, strict=True):
        state = load_file(file)
        assert list(state) == ["<d7>"] and torch.equal(state["<d7>"], vector)
    for path in (ui, ui.parent / "d7"):
        back = read_embedding_file(path)
        assert back.token == "<d7>" and all(torch.equal(a, b) for a, b in zip(back.vectors, vectors, strict=True))


def test_a_file_without_metadata_is_named_by_its_key_or_file_name(tmp_path):
    from safetensors.torch import save_file

    save_file({"emb_params": torch.ones(2, 8)}, str(tmp_path / "my-style.safetensors"))
    save_file({"<cat-toy>": torch.ones(8)}, str(tmp_path / "learned_embeds.safetensors"))
    assert read_embedding_file(tmp_path / "my-style.safetensors").token == "my-style"
    concept = read_embedding_file(tmp_path / "learned_embeds.safetensors")
    assert concept.token == "<cat-toy>" and concept.vectors[0].shape == (1, 8)


def test_a1111_pt_is_read_without_running_code_and_a_pickle_of_classes_is_refused(tmp_path):
    vector = torch.randn(2, 8)
    torch.save({"string_to_param": {"*": vector}, "name": "old-style", "step": 500}, tmp_path / "old.pt")
    read = read_embedding_file(tmp_path / "old.pt")
    assert read.token == "old-style" and torch.equal(read.vectors[0], vector)
    # the original textual-inversion code pickles a ParameterDict: a class, never unpickled here
    torch.save({"string_to_param": torch.nn.ParameterDict({"*": torch.nn.Parameter(vector)})}, tmp_path / "cls.pt")
    with pytest.raises(DataError, match=r"convert it to \.safetensors"):
        read_embedding_file(tmp_path / "cls.pt")


def test_multi_vector_prompts_expand_as_diffusers_does():
    from diffusers.loaders.textual_inversion import TextualInversionLoaderMixin

    tokenizer = build_clip_tokenizer(77)
    tokenizer.add_tokens([*vector_tokens("<d7>", 3), "<one>"])
    prompt = "a handwritten <d7>, and <one> beside <d7>"
    ours = expand_prompt(prompt, tokenizer)
    assert ours == "a handwritten <d7> <d7>_1 <d7>_2, and <one> beside <d7> <d7>_1 <d7>_2"
    assert ours == TextualInversionLoaderMixin().maybe_convert_prompt(prompt, tokenizer)


def test_new_token_rows_are_the_only_trainable_weights_and_read_like_a_resized_table():
    torch.manual_seed(0)
    base = torch.nn.Embedding(10, 4)
    rows = torch.randn(2, 4)
    embedding = NewTokenEmbedding(base, rows, first_id=10)
    assert [name for name, p in embedding.named_parameters() if p.requires_grad] == ["rows"]
    ids = torch.tensor([[0, 10, 3, 11, 9]])
    table = torch.cat([base.weight.detach(), rows])  # what resize_token_embeddings + copying the rows gives
    out = embedding(ids)
    assert torch.equal(out, table[ids])
    out.sum().backward()
    assert torch.equal(embedding.rows.grad, torch.ones(2, 4))


@pytest.mark.parametrize("widths", [[32], [32, 48]], ids=["sd", "sdxl"])
def test_embeddings_bundled_in_a_lora_file_use_the_keys_comfyui_reads_and_come_back(widths):
    """ComfyUI's ``load_embed`` reads ``bundle_emb.<name>.string_to_param.*``, else ``bundle_emb.<name>.<embed_key>``
    (``clip_l``/``clip_g``); AUTOMATIC1111's Lora extension splits ``bundle_emb.<name>.<rest>`` the same way."""
    from trainer.interop.embedding_files import bundle_keys, bundled_embeddings

    vectors = [torch.randn(2, w) for w in widths]
    keys = bundle_keys([Embedding("<d7>", vectors)])
    expected = ["string_to_param.*"] if len(widths) == 1 else ["clip_l", "clip_g"]
    assert sorted(keys) == sorted(f"bundle_emb.<d7>.{name}" for name in expected)
    state = keys | {"lora_unet_x.lora_down.weight": torch.zeros(2, 2)}
    (back,) = bundled_embeddings(state)
    assert back.token == "<d7>" and all(torch.equal(a, b) for a, b in zip(back.vectors, vectors, strict=True))
