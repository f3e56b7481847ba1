"""The single-file key map against diffusers' own ldm -> diffusers converters, on SD-shaped small configs."""

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

from trainer.interop.sd_single_file import (
    UNET_PREFIX,
    VAE_PREFIX,
    KeyMapError,
    to_diffusers,
    to_original,
    unet_rules,
    vae_rules,
)

# SD 1.x's block structure (3 cross-attention down blocks, then a plain one; 2 layers per block),
# and SD 2.x's linear projections, at tiny widths.
SD1_LIKE = dict(
    sample_size=8,
    block_out_channels=[8, 16, 16, 16],
    down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    layers_per_block=2,
    cross_attention_dim=16,
    attention_head_dim=4,
    norm_num_groups=4,
)
SD2_LIKE = {**SD1_LIKE, "use_linear_projection": True, "attention_head_dim": [2, 4, 4, 4]}
TINY = dict(
    sample_size=8,
    block_out_channels=[32, 64],
    down_block_types=["DownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "UpBlock2D"],
    mid_block_type="UNetMidBlock2DCrossAttn",
    layers_per_block=1,
    cross_attention_dim=32,
    attention_head_dim=8,
    norm_num_groups=8,
)

# SDXL's structure (a plain first block, transformer depth growing per level, linear projections, the
# text_time added embedding that ldm calls label_emb) at tiny widths.
SDXL_LIKE = dict(
    sample_size=8,
    block_out_channels=[8, 16, 16],
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    layers_per_block=2,
    transformer_layers_per_block=[1, 2, 3],
    cross_attention_dim=16,
    attention_head_dim=[1, 2, 2],
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=4,
    projection_class_embeddings_input_dim=6 * 4 + 8,
    norm_num_groups=4,
)


def _random_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: torch.randn(v.shape) for k, v in module.state_dict().items()}


@pytest.mark.parametrize(
    "config", [SD1_LIKE, SD2_LIKE, TINY, SDXL_LIKE], ids=["sd1_like", "sd2_like", "tiny", "sdxl_like"]
)
def test_unet_map_agrees_with_diffusers_converter(config):
    unet = UNet2DConditionModel(**config)
    state = _random_state(unet)
    original = to_original(state, unet_rules(unet.config), UNET_PREFIX)
    if config is SD1_LIKE:  # the index diffusers uses to recognise SD 1.x files
        assert "model.diffusion_model.output_blocks.11.0.skip_connection.weight" in original
    converted = convert_ldm_unet_checkpoint(original, dict(unet.config))
    assert converted.keys() == state.keys()
    assert all(torch.equal(converted[k], state[k]) for k in state)
    back = to_diffusers(original, unet_rules(unet.config), UNET_PREFIX)
    assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)


def test_vae_map_agrees_with_diffusers_converter():
    vae = AutoencoderKL(
        block_out_channels=[8, 16, 16, 16],
        down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4,
        layers_per_block=2,
        norm_num_groups=4,
        latent_channels=4,
    )
    state = _random_state(vae)
    original = to_original(state, vae_rules(vae.config), VAE_PREFIX)
    assert original["first_stage_model.encoder.mid.attn_1.q.weight"].shape == (16, 16, 1, 1)  # ldm's 1x1 conv
    converted = convert_ldm_vae_checkpoint(original, dict(vae.config))
    assert converted.keys() == state.keys()
    assert all(torch.equal(converted[k].reshape(state[k].shape), state[k]) for k in state)
    back = to_diffusers(original, vae_rules(vae.config), VAE_PREFIX)
    assert all(torch.equal(back[k], state[k]) for k in state)


def test_unmapped_keys_are_named():
    rules = unet_rules(TINY)
    with pytest.raises(KeyMapError, match=r"no rule maps these diffusers keys.*'add_embedding\.linear_1\.weight'"):
        to_original({"add_embedding.linear_1.weight": torch.zeros(1)}, rules, UNET_PREFIX)
    with pytest.raises(KeyMapError, match=r"model\.diffusion_model\.input_blocks\.9\.0\.op\.weight"):
        to_diffusers({"model.diffusion_model.input_blocks.9.0.op.weight": torch.zeros(1)}, rules, UNET_PREFIX)
    with pytest.raises(KeyMapError, match="class_embed_type='timestep'"):
        unet_rules({**TINY, "class_embed_type": "timestep"})


def test_diffusers_converter_is_not_strict_so_import_keeps_its_own_map():
    """Why lf-import does not read files with diffusers' ``convert_ldm_unet_checkpoint``: it passes over an ldm
    key it has no rule for (here a down block the config does not have) without a word, where ours names it.
    If diffusers becomes strict, this test fails: then import can use its converter."""
    unet = UNet2DConditionModel(**TINY)
    state = _random_state(unet)
    original = to_original(state, unet_rules(unet.config), UNET_PREFIX)
    stray = {**original, "model.diffusion_model.input_blocks.9.0.op.weight": torch.zeros(1)}
    converted = convert_ldm_unet_checkpoint(stray, dict(unet.config))
    assert converted.keys() == state.keys()  # the stray weight is gone, and nothing said so
    with pytest.raises(KeyMapError, match=r"input_blocks\.9\.0\.op\.weight"):
        to_diffusers(stray, unet_rules(unet.config), UNET_PREFIX)
