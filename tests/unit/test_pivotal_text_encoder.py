"""Pivotal tuning's text-encoder adapters: what they need, and no idle adapter left trainable (DDP's rule)."""

from __future__ import annotations

import pytest
import torch
from transformers import CLIPTextConfig, CLIPTextModel

from lf_common.errors import ConfigError
from trainer.lora.adapters import TEXT_ENCODER_TARGETS, LoraSettings, add_lora


def test_text_encoder_adapters_need_the_unets_one_kind_and_an_sdxl_second_encoder():
    from trainer.lora.adapters import LoraSettings
    from trainer.modules.textual_inversion import check_encoder_adapters

    lora, loha = LoraSettings(), LoraSettings(kind="loha")
    assert check_encoder_adapters(lora, lora, None, 1) == [lora]
    assert check_encoder_adapters(lora, lora, lora, 2) == [lora, lora]
    with pytest.raises(ConfigError, match=r"model.text_encoder_lora trains with the UNet's adapters .* set model.lora"):
        check_encoder_adapters(None, lora, None, 1)
    with pytest.raises(ConfigError, match=r"model.text_encoder_2_lora is for SDXL's second text encoder"):
        check_encoder_adapters(lora, lora, lora, 1)
    with pytest.raises(ConfigError, match=r"model.lora.kind=lora, model.text_encoder_lora.kind=loha: .* one kind"):
        check_encoder_adapters(lora, loha, None, 1)


@pytest.mark.parametrize("clip_skip", [1, 2, 3])
def test_with_clip_skip_every_trainable_adapter_gets_a_gradient(clip_skip):
    """clip_skip=k reads hidden_states[-k] through the final norm: the last k-1 layers' adapters must be frozen, or
    DDP (find_unused_parameters=false) fails on their missing gradients."""
    from trainer.modules.text_encoder_training import freeze_unread_layers

    def trainable_without_gradient(freeze: bool) -> set[str]:
        torch.manual_seed(0)
        config = CLIPTextConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=4,
                                num_attention_heads=2, max_position_embeddings=8)  # fmt: skip
        encoder = CLIPTextModel(config)
        add_lora(encoder, LoraSettings(rank=2, target_modules=list(TEXT_ENCODER_TARGETS)))
        if freeze:
            freeze_unread_layers(encoder, clip_skip)
        output = encoder(torch.randint(64, (2, 8)), output_hidden_states=True)
        model = getattr(encoder, "text_model", encoder)
        model.final_layer_norm(output.hidden_states[-clip_skip]).square().sum().backward()
        return {n for n, p in encoder.named_parameters() if p.requires_grad and p.grad is None}

    assert trainable_without_gradient(freeze=True) == set()
    idle = trainable_without_gradient(freeze=False)
    assert len(idle) == (clip_skip - 1) * 2 * len(TEXT_ENCODER_TARGETS)  # lora_A and lora_B per target and layer
