"""The textual-inversion recipes compose, and sharded strategies are refused when the config is checked."""

from __future__ import annotations

import pytest

from lf_common.errors import ConfigError
from trainer.cli.hydra_app import compose_config
from trainer.strategies.optimizer_support import check_optimizer
from trainer.textual_inversion.new_tokens import TextualInversionSettings

BASE = ["model.pretrained=base", "data.train_dir=latents", "trainer.accelerator=cpu"]


@pytest.mark.parametrize("experiment", ["textual_inversion", "textual_inversion_sdxl"])
@pytest.mark.parametrize("strategy", ["fsdp", "deepspeed_stage_3"])
def test_sharded_strategies_are_refused_in_one_line(experiment, strategy):
    cfg = compose_config("train", [f"experiment={experiment}", f"strategy={strategy}", *BASE])
    with pytest.raises(ConfigError, match=r"textual inversion trains a few vectors .* use strategy=ddp or deepspeed"):
        check_optimizer(cfg)


@pytest.mark.parametrize("strategy", ["single", "ddp", "deepspeed_stage_1", "deepspeed_stage_2"])
def test_the_other_strategies_pass(strategy):
    check_optimizer(compose_config("train", ["experiment=textual_inversion", f"strategy={strategy}", *BASE]))


def test_settings_refuse_templates_without_a_place_for_the_token():
    with pytest.raises(ConfigError, match=r"each needs \{\} where the token goes"):
        TextualInversionSettings(tokens=("<d7>",), templates=("a photo",))
    with pytest.raises(ConfigError, match=r"give distinct, non-empty words"):
        TextualInversionSettings(tokens=("<d7>", "<d7>"))


def test_pivotal_tuning_composes_and_its_freeze_is_refused_under_deepspeed():
    cfg = compose_config("train", ["experiment=pivotal_lora", *BASE])
    assert cfg.model.lora.rank > 0 and cfg.model.textual_inversion.train_fraction == 0.5
    assert cfg.optim.embedding_lr > cfg.optim.lr  # the rows' LR and the adapters'
    check_optimizer(cfg)
    with pytest.raises(ConfigError, match=r"train_fraction < 1 .* DeepSpeed steps its own copy"):
        check_optimizer(compose_config("train", ["experiment=pivotal_lora", "strategy=deepspeed_stage_2", *BASE]))


@pytest.mark.parametrize(
    ("experiment", "encoders"),
    [("pivotal_lora_text_encoder", 1), ("pivotal_lora_sdxl", 0), ("pivotal_lora_sdxl_text_encoder", 2)],
)
def test_pivotal_recipes_compose_with_their_encoder_adapters(experiment, encoders):
    cfg = compose_config("train", [f"experiment={experiment}", *BASE])
    assert cfg.model.lora.rank > 0 and cfg.model.textual_inversion.train_fraction == 0.5
    adapters = [cfg.model.get(key) for key in ("text_encoder_lora", "text_encoder_2_lora")]
    assert sum(a is not None for a in adapters) == encoders
    assert (cfg.model.get("text_encoder_2") is not None) == ("sdxl" in experiment)
    check_optimizer(cfg)
