"""LoRA adapters on the tiny UNet and CLIP text encoder: only adapters train, bad targets are named,
kohya keys."""

from __future__ import annotations

import pytest
import torch
from hydra.utils import instantiate

from tests.conftest import compose_config
from trainer.cli.hydra_app import optimizer_factories
from trainer.interop.lora_formats import kohya_state_dict
from trainer.lora.adapters import TEXT_ENCODER_TARGETS, AdapterWeights, LoraSettings, adapter_state_dict, add_lora


def lora_module() -> torch.nn.Module:
    cfg = compose_config("train", ["experiment=lora", "data.train_dir=x", "output_dir=o", "optim.lr=1e-2"])
    module = instantiate(
        cfg.model, optimizer=optimizer_factories(cfg)["optimizer"], uncond_text=None, caption_dropout=0.0
    )
    return module


def test_only_the_adapters_train():
    torch.manual_seed(0)
    module = lora_module()
    before = {k: v.clone() for k, v in module.unet.state_dict().items()}
    optimizer = module.configure_optimizers()
    optimizer = optimizer["optimizer"] if isinstance(optimizer, dict) else optimizer
    trained = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert trained == {id(p) for n, p in module.unet.named_parameters() if "lora_" in n}
    for _ in range(3):
        batch = {"latents": torch.randn(4, 4, 8, 8), "text": torch.randn(4, 8, 32)}
        optimizer.zero_grad()
        module.compute_loss(batch).loss.backward()
        optimizer.step()
    after = module.unet.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(".lora_" in k for k in changed)
    assert any(".lora_B." in k for k in changed)  # B starts at zero: the update is no longer zero


def test_unknown_target_module_lists_the_available_names():
    cfg = compose_config("train", ["data.train_dir=x", "output_dir=o"])
    with pytest.raises(ValueError, match=r"\['to_qkv'\] match no Linear/Conv2d module.*'to_q'"):
        add_lora(instantiate(cfg.model.unet), LoraSettings(target_modules=["to_q", "to_qkv"]))


def test_kohya_keys_shapes_and_alpha():
    cfg = compose_config("train", ["data.train_dir=x", "output_dir=o"])
    unet = instantiate(cfg.model.unet)
    settings = LoraSettings(rank=2, alpha=8.0, target_modules=["to_q", "to_out.0"])
    add_lora(unet, settings)
    kohya = kohya_state_dict(AdapterWeights(adapter_state_dict(unet), settings))
    q = "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_q"
    out = "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_out_0"
    assert kohya[f"{q}.lora_down.weight"].shape == (2, 64)  # (rank, in): mid block width 64
    assert kohya[f"{q}.lora_up.weight"].shape == (64, 2)  # (out, rank)
    assert kohya[f"{out}.lora_up.weight"].shape == (64, 2)
    assert float(kohya[f"{q}.alpha"]) == 8.0
    assert all(k.startswith("lora_unet_") for k in kohya)
    assert len(kohya) == 4 * 3  # to_q and to_out.0 of attn1 and attn2, each down/up/alpha


def test_text_encoder_kohya_keys_use_sd_clip_layout(tmp_path):
    from transformers import CLIPTextModel

    from trainer.tiny_models.tiny_text_encoder import save_tiny_text_encoder

    save_tiny_text_encoder(tmp_path, num_layers=2)
    text_encoder = CLIPTextModel.from_pretrained(tmp_path / "text_encoder", local_files_only=True)
    with pytest.raises(ValueError, match=r"model.text_encoder_lora.target_modules: \['to_q'\].*'q_proj'"):
        add_lora(text_encoder, LoraSettings(target_modules=["to_q"]), "model.text_encoder_lora")
    settings = LoraSettings(rank=2, alpha=1.0, target_modules=list(TEXT_ENCODER_TARGETS))
    trainable = add_lora(text_encoder, settings)
    assert trainable == 2 * 4 * (2 * 32 + 32 * 2)  # layers x projections x (A (2,32) + B (32,2))
    unet_settings = LoraSettings(rank=4, alpha=4.0, target_modules=["to_q"])
    unet = instantiate(compose_config("train", ["data.train_dir=x", "output_dir=o"]).model.unet)
    add_lora(unet, unet_settings)
    kohya = kohya_state_dict(
        AdapterWeights(adapter_state_dict(unet), unet_settings),
        AdapterWeights(adapter_state_dict(text_encoder), settings),
    )
    q = "lora_te_text_model_encoder_layers_1_self_attn_q_proj"  # what A1111 and kohya expect for SD 1.x
    assert kohya[f"{q}.lora_down.weight"].shape == (2, 32)
    assert kohya[f"{q}.lora_up.weight"].shape == (32, 2)
    assert float(kohya[f"{q}.alpha"]) == 1.0  # each part keeps its own alpha
    assert float(kohya["lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_q.alpha"]) == 4.0
    assert len([k for k in kohya if k.startswith("lora_te_")]) == 2 * 4 * 3
