"""Model type detection on full-size shapes (meta tensors: no memory), the ldm EMA name grammar, and the
SD 2.x prediction-type rule."""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders.single_file_utils import infer_diffusers_model_type
from transformers import CLIPTextConfig, CLIPTextModel

from lf_common.errors import ConfigError
from tests.small_sd import original_file_state, small_parts
from trainer.interop.architecture import scaled_configs
from trainer.interop.layouts import normalize
from trainer.interop.ldm_ema import ema_key_to_unet_key
from trainer.interop.model_types import BY_NAME, candidates
from trainer.interop.pipeline_weights import PipelineParts
from trainer.interop.prediction_type import by_test_forward, from_metadata, given
from trainer.interop.safe_load import WeightFile
from trainer.interop.sd_single_file import EMA_PREFIX, UNET_PREFIX

DIFFUSERS_NAMES = {"sd1": "v1", "sd1_inpainting": "inpainting", "sd2": "v2", "sd2_v": "v2",
                   "sd2_inpainting": "inpainting_v2"}  # fmt: skip


def full_size_state(name: str) -> dict[str, torch.Tensor]:
    """A reference file's keys and shapes (SD 2.x with OpenCLIP's whole tower), as meta tensors."""
    configs = BY_NAME[name].configs()
    with torch.device("meta"):
        parts = PipelineParts(
            UNet2DConditionModel.from_config(configs["unet"]),
            AutoencoderKL.from_config(configs["vae"]),
            CLIPTextModel(CLIPTextConfig(**configs["text_encoder"])),
        )
        return original_file_state(parts, name)


@pytest.mark.parametrize("name", list(DIFFUSERS_NAMES))
def test_full_size_files_get_their_type_and_exactly_the_standard_configs(name):
    state = normalize(WeightFile(full_size_state(name)), "ref.safetensors").state
    assert infer_diffusers_model_type(state) == DIFFUSERS_NAMES[name]  # diffusers' own detection agrees
    rows = candidates(state, "ref.safetensors")
    assert name in [row.name for row in rows]
    assert len(rows) == (2 if name in ("sd2", "sd2_v") else 1)  # only the prediction type tells these apart
    assert scaled_configs(state, BY_NAME[name], "ref.safetensors") == BY_NAME[name].configs()


@pytest.mark.parametrize("name", ["sd1", "sd2"])
def test_ldm_ema_names_get_their_dots_back(name):
    unet_keys = [key for key in full_size_state(name) if key.startswith(UNET_PREFIX)]
    for key in unet_keys:  # ldm's LitEma: "model.diffusion_model.a.0.b" -> "model_ema.diffusion_modela0b"
        assert ema_key_to_unet_key(EMA_PREFIX + key.removeprefix("model.").replace(".", "")) == key
    assert ema_key_to_unet_key("model_ema.diffusion_modelinput_blocks1frobweight") is None


def test_sd2_prediction_type_by_a1111_test_pass_by_metadata_or_given():
    unet = small_parts("sd2").unet
    with torch.no_grad():  # make the output a known constant c: mean(output - 0.5) = c - 0.5
        unet.conv_out.weight.zero_()
        unet.conv_out.bias.fill_(-2.0)
    v = by_test_forward(unet)
    assert v.value == "v_prediction" and "-2.500 < -1.0" in v.how
    with torch.no_grad():
        unet.conv_out.bias.fill_(0.5)
    assert by_test_forward(unet).value == "epsilon"
    assert from_metadata({"modelspec.prediction_type": "v"}).value == "v_prediction"
    assert from_metadata({"latentforge.configs": '{"scheduler": {"prediction_type": "epsilon"}}'}).value == "epsilon"
    assert from_metadata({}) is None
    assert given("v_prediction").value == "v_prediction"
    with pytest.raises(ConfigError, match=r"prediction_type='v': expected one of epsilon, v_prediction"):
        given("v")


def test_full_size_sdxl_file_gets_its_type_and_exactly_the_standard_configs():
    """SDXL base's keys and shapes (meta tensors), with the extras its own file carries."""
    from transformers import CLIPTextModelWithProjection

    from trainer.interop.pipeline_weights import original_state_dict

    configs = BY_NAME["sdxl"].configs()
    with torch.device("meta"):
        parts = PipelineParts(
            UNet2DConditionModel.from_config(configs["unet"]),
            AutoencoderKL.from_config(configs["vae"]),
            CLIPTextModel(CLIPTextConfig(**configs["text_encoder"])),
            CLIPTextModelWithProjection(CLIPTextConfig(**configs["text_encoder_2"])),
        )
        state = original_state_dict(parts, "sdxl") | {"conditioner.embedders.1.model.logit_scale": torch.empty(())}
    assert state["model.diffusion_model.label_emb.0.0.weight"].shape == (1280, 2816)
    assert state["conditioner.embedders.1.model.text_projection"].shape == (1280, 1280)
    state = normalize(WeightFile(state), "sd_xl_base.safetensors").state
    assert infer_diffusers_model_type(state) == "xl_base"  # diffusers' own detection agrees
    assert [row.name for row in candidates(state, "sd_xl_base.safetensors")] == ["sdxl"]
    assert scaled_configs(state, BY_NAME["sdxl"], "sd_xl_base.safetensors") == configs


def test_diffusers_type_inference_needs_full_size_shapes_so_import_keeps_its_own_table():
    """diffusers' ``infer_diffusers_model_type`` tells SD 2.x by a 1024-wide cross-attention, so an SD 2.x
    architecture at other sizes is 'v1' to it (and its configs would come from the hub); the table here reads
    the text encoder's layout and the UNet's input channels. If diffusers agrees one day, this test fails."""
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type

    state = original_file_state(small_parts("sd2"), "sd2")
    assert infer_diffusers_model_type(state) == "v1"
    assert [row.name for row in candidates(normalize(WeightFile(state), "small_sd2").state, "small_sd2")] == [
        "sd2",
        "sd2_v",
    ]
