"""SDXL in one ``.safetensors`` of SDXL's original layout: export, strict import, and diffusers' own loader.

A small random SDXL folder (:mod:`tests.small_sdxl`) goes through ``lf-export format=single_file``
and ``lf-import`` back to identical tensors; diffusers' ``StableDiffusionXLPipeline.from_single_file``
(given the folder as its local config, no hub) reads the same file to the same tensors, which shows
that our export is the inverse of diffusers' ldm -> diffusers converters; a file without our
metadata (as SDXL's own files) imports with ``config_dir``, and is refused by name without it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from tests.small_sdxl import pipeline_tensors, save_small_sdxl, small_sdxl_configs
from trainer.checkpoint.export import export_single_file
from trainer.interop.import_weights import IMPORT_INFO_NAME, import_weights
from trainer.interop.pipeline_weights import build_parts, load_diffusers_folder, original_state_dict
from trainer.interop.sd_single_file import SDXL_OPEN_CLIP_PREFIX, KeyMapError
from trainer.interop.sd_text_encoder_keys import open_clip_to_text, text_to_open_clip

SDXL_PREFIXES = (
    "model.diffusion_model.",
    "first_stage_model.",
    "conditioner.embedders.0.transformer.text_model.",
    "conditioner.embedders.1.model.",
)


@pytest.fixture(scope="module")
def sdxl_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_small_sdxl(tmp_path_factory.mktemp("small_sdxl") / "pipe")


@pytest.fixture(scope="module")
def config_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same configs with other weights: what a loader takes from it can only be configs."""
    return save_small_sdxl(tmp_path_factory.mktemp("small_sdxl_configs") / "pipe", seed=1)


@pytest.fixture(scope="module")
def sdxl_file(sdxl_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_single_file(sdxl_folder, tmp_path_factory.mktemp("single") / "sdxl.safetensors")


def _folder_tensors(folder: Path) -> dict[str, torch.Tensor]:
    return pipeline_tensors(StableDiffusionXLPipeline.from_pretrained(folder, local_files_only=True))


def _assert_same(found: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert found.keys() == expected.keys()
    for key, tensor in expected.items():
        assert torch.equal(found[key], tensor), key


def test_the_file_has_sdxl_original_keys(sdxl_file: Path) -> None:
    state = load_file(str(sdxl_file))
    assert all(key.startswith(SDXL_PREFIXES) for key in state), [k for k in state if not k.startswith(SDXL_PREFIXES)]
    for prefix in SDXL_PREFIXES:
        assert any(key.startswith(prefix) for key in state), prefix
    bigg = "conditioner.embedders.1.model."
    assert state[bigg + "transformer.resblocks.0.attn.in_proj_weight"].shape == (3 * 48, 48)  # fused q/k/v
    assert state[bigg + "text_projection"].shape == (48, 24)  # (width, projection), OpenCLIP's orientation
    assert state["model.diffusion_model.label_emb.0.0.weight"].shape == (4 * 16, 6 * 8 + 24)  # text_time
    assert "model.diffusion_model.input_blocks.7.1.transformer_blocks.1.attn2.to_k.weight" in state  # depth 2
    with safe_open(str(sdxl_file), framework="pt") as handle:
        configs = json.loads(handle.metadata()["latentforge.configs"])
    assert {"text_encoder_2", "tokenizer_2"} <= configs.keys()


def test_export_then_import_gives_the_same_tensors(sdxl_folder: Path, sdxl_file: Path, tmp_path: Path) -> None:
    out = import_weights(sdxl_file, tmp_path / "imported")
    info = json.loads((out / IMPORT_INFO_NAME).read_text())
    assert info["model_type"] == "sdxl" and info["configs_from"].startswith("the file's metadata")
    _assert_same(_folder_tensors(out), _folder_tensors(sdxl_folder))
    tokenizer_2 = json.loads((out / "tokenizer_2" / "tokenizer_config.json").read_text())
    assert tokenizer_2["pad_token"] == "!" and tokenizer_2["model_max_length"] == 8


def test_an_sdxl_folder_imports_as_it_is(sdxl_folder: Path, tmp_path: Path) -> None:
    out = import_weights(sdxl_folder, tmp_path / "imported")
    assert json.loads((out / "model_index.json").read_text())["_class_name"] == "StableDiffusionXLPipeline"
    _assert_same(_folder_tensors(out), _folder_tensors(sdxl_folder))


def test_diffusers_from_single_file_reads_our_file(
    sdxl_folder: Path, sdxl_file: Path, config_folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pipe = StableDiffusionXLPipeline.from_single_file(str(sdxl_file), config=str(config_folder), local_files_only=True)
    _assert_same(pipeline_tensors(pipe), _folder_tensors(sdxl_folder))


def test_a_file_without_our_metadata_imports_with_config_dir(
    sdxl_folder: Path, config_folder: Path, tmp_path: Path
) -> None:
    parts = load_diffusers_folder(sdxl_folder)
    state = original_state_dict(parts, "sdxl")
    # what SDXL base's own file carries beside the weights, and import ignores by name
    state[SDXL_OPEN_CLIP_PREFIX + "logit_scale"] = torch.tensor(4.6)
    state["conditioner.embedders.0.transformer.text_model.embeddings.position_ids"] = torch.arange(8)[None]
    path = tmp_path / "foreign.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    with pytest.raises(KeyMapError, match="config_dir=FOLDER"):
        import_weights(path, tmp_path / "refused")
    out = import_weights(path, tmp_path / "imported", config_dir=config_folder)
    _assert_same(_folder_tensors(out), _folder_tensors(sdxl_folder))


def test_a_missing_key_is_named(sdxl_file: Path, tmp_path: Path) -> None:
    state = load_file(str(sdxl_file))
    with safe_open(str(sdxl_file), framework="pt") as handle:
        metadata = handle.metadata()
    del state["conditioner.embedders.1.model.text_projection"]
    path = tmp_path / "broken.safetensors"
    save_file(state, str(path), metadata=metadata)
    with pytest.raises(KeyMapError, match=r"broken\.safetensors.*missing keys.*text_projection"):
        import_weights(path, tmp_path / "out")


def test_open_clip_map_is_diffusers_converter_inverse(sdxl_folder: Path) -> None:
    encoder = load_diffusers_folder(sdxl_folder).text_encoder_2
    original = text_to_open_clip(encoder.state_dict(), SDXL_OPEN_CLIP_PREFIX)
    by_diffusers = convert_open_clip_checkpoint(encoder, original, prefix=SDXL_OPEN_CLIP_PREFIX)
    _assert_same(by_diffusers, encoder.state_dict())
    ours = open_clip_to_text(original, SDXL_OPEN_CLIP_PREFIX)
    _assert_same(ours, {k.removeprefix("text_model."): v for k, v in encoder.state_dict().items()})


def test_a_small_sdxl_file_imports_with_nothing_else(tmp_path: Path) -> None:
    """An SDXL file of the standard architecture at small sizes, without our metadata (as SDXL base's own
    file): detected, its configs read from its shapes and the SDXL standard, every tensor equal."""
    configs = small_sdxl_configs()
    parts = build_parts(configs)
    torch.manual_seed(0)
    with torch.no_grad():
        for network in parts.networks().values():
            for parameter in network.parameters():
                parameter.normal_(0.0, 0.05)
    state = original_state_dict(parts, "sdxl") | {SDXL_OPEN_CLIP_PREFIX + "logit_scale": torch.tensor(4.6)}
    path = tmp_path / "sdxl_base_small.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    out = import_weights(path, tmp_path / "imported")
    info = json.loads((out / IMPORT_INFO_NAME).read_text())
    assert info["model_type"] == "sdxl" and info["configs_from"] == "the SDXL base standard configs"
    imported = load_diffusers_folder(out)
    for name, network in imported.networks().items():
        config = network.config if name in ("unet", "vae") else network.config.to_dict()
        expected = {k: v for k, v in configs[name].items() if not k.startswith("_") and k in config}
        assert {k: config[k] for k in expected} == expected, name
        reference = parts.networks()[name].state_dict()
        for key, tensor in network.state_dict().items():
            assert torch.equal(tensor, reference[key]), f"{name}.{key}"
    assert json.loads((out / "tokenizer_2" / "tokenizer_config.json").read_text())["pad_token"] == "!"
