"""SDXL LoRA files in diffusers' and kohya's layouts, from random adapters on a small SDXL model.

kohya's SDXL layout names the UNet's modules as ldm does (``lora_unet_input_blocks_4_1_...``, from the
single-file key map) and the encoders ``lora_te1_`` / ``lora_te2_``. Each file, read back by
diffusers' loaders (``lf-sample lora=``), gives the outputs of the adapters it was written from; a
kohya file read and written again is the same file, and so is its diffusers twin. The first encoder's
adapters sit on ``q_proj`` and ``fc1`` without ``out_proj``: diffusers' own loader would drop its
attention adapters (see ``trainer.interop.lora_loading.uniform_text_names``).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.small_sdxl import PROJECTION, save_small_sdxl
from trainer.interop.lora_formats import (
    DIFFUSERS_LORA_FILE,
    KOHYA_LORA_FILE,
    save_lora_files,
    sdxl_lora_names,
)
from trainer.interop.lora_loading import add_adapters_from_file, load_lora
from trainer.interop.pipeline_weights import PipelineParts, load_diffusers_folder
from trainer.lora.adapters import AdapterWeights, LoraSettings, adapter_state_dict, add_lora

# attention, feed-forward, projection, resnet convolutions and time embedding, a shortcut, a downsampler
UNET = LoraSettings(rank=2, alpha=3.0, target_modules=["to_q", "to_out.0", "proj_in", "conv1", "conv_shortcut",
                                                       "time_emb_proj", "downsamplers.0.conv"])  # fmt: skip
TEXT = LoraSettings(rank=2, alpha=1.0, target_modules=["q_proj", "fc1"])  # attention without out_proj, and MLP
TEXT_2 = LoraSettings(rank=4, alpha=2.0, target_modules=["v_proj", "out_proj", "fc2"])
SETTINGS = {"unet": UNET, "text_encoder": TEXT, "text_encoder_2": TEXT_2}
X, T = torch.randn(1, 4, 8, 8), torch.tensor([700])
TEXT_STATES, IDS = torch.randn(1, 8, 80), torch.randint(0, 49406, (1, 8))
ADDED = {"text_embeds": torch.randn(1, PROJECTION), "time_ids": torch.tensor([[32.0, 32, 0, 0, 32, 32]])}


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_small_sdxl(tmp_path_factory.mktemp("small_sdxl") / "pipe")


def _outputs(parts: PipelineParts) -> list[torch.Tensor]:
    with torch.no_grad():
        return [
            parts.unet(X, T, TEXT_STATES, added_cond_kwargs=ADDED).sample,
            parts.text_encoder(IDS).last_hidden_state,
            parts.text_encoder_2(IDS).text_embeds,
        ]


@pytest.fixture(scope="module")
def written(folder: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[torch.Tensor]]:
    """A LoRA folder written from random adapters on all three parts, and the outputs they give."""
    parts = load_diffusers_folder(folder)
    torch.manual_seed(3)
    weights = {}
    for name, network in parts.networks().items():
        if name in SETTINGS:
            add_lora(network, SETTINGS[name])
            with torch.no_grad():
                for parameter in network.parameters():
                    if parameter.requires_grad:
                        parameter.normal_(0.0, 0.2)
            weights[name] = AdapterWeights(adapter_state_dict(network), SETTINGS[name])
    out = tmp_path_factory.mktemp("lora")
    names = sdxl_lora_names(parts.unet)
    save_lora_files(out, weights["unet"], weights["text_encoder"], weights["text_encoder_2"], names)
    return out, _outputs(parts)


def test_kohya_file_has_sdxl_names(written: tuple[Path, list[torch.Tensor]]) -> None:
    state = load_file(str(written[0] / KOHYA_LORA_FILE))
    modules = {key.split(".")[0] for key in state}
    assert all(m.startswith(("lora_unet_", "lora_te1_", "lora_te2_")) for m in modules), sorted(modules)
    for name in ("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q",  # down_blocks.1.attentions.0
                 "lora_unet_input_blocks_1_0_in_layers_2",  # down_blocks.0.resnets.0.conv1
                 "lora_unet_input_blocks_3_0_op",  # down_blocks.0.downsamplers.0.conv
                 "lora_unet_middle_block_1_proj_in",
                 "lora_unet_output_blocks_2_1_transformer_blocks_1_attn1_to_out_0",  # depth 2
                 "lora_unet_output_blocks_0_0_skip_connection",
                 "lora_unet_output_blocks_0_0_emb_layers_1",
                 "lora_te1_text_model_encoder_layers_0_self_attn_q_proj",
                 "lora_te2_text_model_encoder_layers_1_self_attn_out_proj"):  # fmt: skip
        assert name in modules, name
    assert not any("down_blocks" in m or "lora_te_" in m for m in modules)
    assert state["lora_te2_text_model_encoder_layers_0_self_attn_v_proj.alpha"].item() == 2.0


@pytest.mark.parametrize("file", [KOHYA_LORA_FILE, DIFFUSERS_LORA_FILE])
def test_each_file_gives_the_adapters_outputs(folder: Path, written: tuple[Path, list[torch.Tensor]], file: str):
    parts = load_diffusers_folder(folder)
    base = _outputs(parts)
    loaded = load_lora(parts.unet, parts.text_encoder, written[0] / file, text_encoder_2=parts.text_encoder_2)
    assert sorted(loaded) == ["text_encoder", "text_encoder_2", "unet"]
    for found, expected, before in zip(_outputs(parts), written[1], base, strict=True):
        assert not torch.allclose(expected, before, atol=1e-4), "the adapters change nothing"
        torch.testing.assert_close(found, expected, atol=1e-5, rtol=1e-5)


def test_kohya_to_diffusers_and_back_is_lossless(folder: Path, written: tuple[Path, list[torch.Tensor]], tmp_path):
    parts = load_diffusers_folder(folder)
    models = {name: network for name, network in parts.networks().items() if name in SETTINGS}
    settings = add_adapters_from_file(written[0] / KOHYA_LORA_FILE, models, "default")
    weights = {name: AdapterWeights(adapter_state_dict(models[name]), settings[name]) for name in SETTINGS}
    save_lora_files(tmp_path, weights["unet"], weights["text_encoder"], weights["text_encoder_2"],
                    sdxl_lora_names(parts.unet))  # fmt: skip
    for file in (KOHYA_LORA_FILE, DIFFUSERS_LORA_FILE):
        again, first = load_file(str(tmp_path / file)), load_file(str(written[0] / file))
        assert again.keys() == first.keys(), file
        for key, tensor in first.items():
            assert torch.equal(again[key], tensor), (file, key)
