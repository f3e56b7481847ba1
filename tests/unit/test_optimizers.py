"""The optim group: per-part learning rates and weight decay reach the optimizer's parameter groups, kohya's
block LRs reach the right UNet blocks, and combinations that cannot train are refused when composed."""

from __future__ import annotations

import logging

import pytest
import torch
from diffusers import UNet2DConditionModel
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from transformers import CLIPTextConfig, CLIPTextModel

from lf_common.errors import ConfigError
from tests.conftest import compose_config
from trainer.cli.fit_run import log_own_schedule
from trainer.cli.hydra_app import optimizer_factories
from trainer.modules.param_groups import block_index, parameter_groups, unet_blocks
from trainer.strategies.optimizer_support import check_optimizer

BASE = ["data.train_dir=x", "output_dir=o", "trainer.accelerator=cpu"]


def tiny_text_encoder() -> CLIPTextModel:
    config = CLIPTextConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                            num_attention_heads=2, max_position_embeddings=8)  # fmt: skip
    return CLIPTextModel(config)


def test_per_part_learning_rates_and_weight_decay_reach_the_param_groups():
    cfg = compose_config("train", [*BASE, "optim=lion", "optim.unet_lr=3e-5", "optim.text_encoder_lr=2e-6",
                                   "optim.text_encoder_2_lr=4e-6", "optim.embedding_lr=1e-6",
                                   "optim.embedding_weight_decay=0", "optim.unet_weight_decay=0.2"])  # fmt: skip
    factories = optimizer_factories(cfg, param_groups=True)
    module = instantiate(cfg.model, optimizer=factories["optimizer"], param_groups=factories["param_groups"])
    encoders = [tiny_text_encoder(), tiny_text_encoder()]
    optimizer = factories["optimizer"](params=parameter_groups(module.unet, encoders, module.param_group_settings))
    groups = {group["name"]: group for group in optimizer.param_groups}
    assert {name: (g["lr"], g["weight_decay"]) for name, g in groups.items()} == {
        "unet": (3e-5, 0.2),
        "text_encoder": (2e-6, cfg.optim.weight_decay),
        "text_encoder_2": (4e-6, cfg.optim.weight_decay),
        "embeddings": (1e-6, 0.0),
    }
    assert {id(p) for p in groups["unet"]["params"]} == {id(p) for p in module.unet.parameters()}
    embeddings = {id(p) for e in encoders for p in getattr(e, "text_model", e).embeddings.parameters()}
    assert {id(p) for p in groups["embeddings"]["params"]} == embeddings
    assert not embeddings & {id(p) for p in groups["text_encoder"]["params"]}


def test_unset_parts_take_the_optimizers_own_values():
    cfg = compose_config("train", [*BASE, "optim.lr=7e-4"])
    module = instantiate(cfg.model, **optimizer_factories(cfg, param_groups=True))
    optimizer = module.configure_optimizers()["optimizer"]
    ((group),) = optimizer.param_groups  # initial_lr: the LR before the warm-up schedule scales it
    assert group["name"] == "unet" and group["initial_lr"] == 7e-4 and group["weight_decay"] == cfg.optim.weight_decay


def sdxl_unet() -> UNet2DConditionModel:
    cfg = compose_config("train", [*BASE, "model=sdxl"])
    with torch.device("meta"):
        return instantiate(cfg.model.unet)


def test_block_numbering_is_kohyas_for_sdxl():
    unet = sdxl_unet()
    blocks = unet_blocks(unet)
    assert len(blocks) == 23  # kohya's UNET_NUM_BLOCKS_FOR_BLOCK_LR
    expected = {  # diffusers name -> kohya's index (LDM: input_blocks.N -> 1+N, middle_block.N -> 10+N, ...)
        "time_embedding.linear_1.weight": 0, "add_embedding.linear_1.weight": 0,
        "conv_in.weight": 1,  # input_blocks.0
        "down_blocks.0.resnets.1.conv1.weight": 3,  # input_blocks.2
        "down_blocks.0.downsamplers.0.conv.weight": 4,  # input_blocks.3
        "down_blocks.1.attentions.0.proj_in.weight": 5,  # input_blocks.4
        "down_blocks.2.resnets.1.conv2.weight": 9,  # input_blocks.8
        "mid_block.resnets.0.conv1.weight": 10, "mid_block.attentions.0.proj_out.weight": 11,
        "mid_block.resnets.1.conv1.weight": 12,
        "up_blocks.0.resnets.0.conv1.weight": 13,  # output_blocks.0
        "up_blocks.0.upsamplers.0.conv.weight": 15,  # output_blocks.2 holds the upsampler
        "up_blocks.2.resnets.2.conv1.weight": 21,  # output_blocks.8
        "conv_norm_out.weight": 22, "conv_out.weight": 22,
    }  # fmt: skip
    assert {name: block_index(name, blocks) for name in expected} == expected
    names = dict(unet.named_parameters())
    assert all(block_index(name, blocks) in range(23) for name in names)


def test_block_lrs_reach_their_blocks_and_zero_freezes():
    cfg = compose_config("train", [*BASE, "model=sdxl_tiny"])
    with torch.device("meta"):
        unet = instantiate(cfg.model.unet)
    count = len(unet_blocks(unet))
    lrs = [0.0] + [1e-6 * (i + 1) for i in range(1, count)]  # block 0 (the embeddings) frozen
    overrides = [*BASE, "model=sdxl_tiny", f"optim.block_lr=[{','.join(map(str, lrs))}]"]
    cfg = compose_config("train", overrides)
    module = instantiate(cfg.model, **optimizer_factories(cfg, param_groups=True))
    optimizer = module.configure_optimizers()["optimizer"]
    blocks = unet_blocks(module.unet)
    seen = set()
    for group in optimizer.param_groups:
        index = int(group["name"].removeprefix("unet.block"))
        assert group["initial_lr"] == lrs[index]  # the LR before the warm-up schedule scales it
        seen |= {id(p) for p in group["params"]}
    for name, param in module.unet.named_parameters():
        frozen = block_index(name, blocks) == 0
        assert param.requires_grad is not frozen and (id(param) in seen) is not frozen, name
    bad = compose_config("train", [*BASE, "model=sdxl_tiny", "optim.block_lr=[1,2,3]"])
    with pytest.raises(InstantiationException) as refused:  # the commands print the ConfigError it wraps
        instantiate(bad.model, **optimizer_factories(bad, param_groups=True))
    assert isinstance(refused.value.__cause__, ConfigError)
    assert f"has 3 values; this UNet has {count} blocks" in str(refused.value.__cause__)


REFUSED = {  # overrides -> a phrase of the one-line refusal
    ("optim=schedule_free_adamw", "lr_scheduler=constant", "strategy=deepspeed_stage_2"): "DeepSpeed steps its own",
    ("optim=adafactor", "trainer.precision=bf16-true"): "use trainer.precision=bf16-mixed",
    ("optim=schedule_free_adamw", "lr_scheduler=cosine_warmup"): "use lr_scheduler=constant",
    ("lr_scheduler=constant_warmup", "optim=schedule_free_adamw"): "use lr_scheduler=constant",
    ("experiment=demo_digits", "optim=schedule_free_adamw"): "add optim.warmup_steps=50 ~lr_scheduler.num_warmup",
    ("optim=adafactor", "strategy=fsdp"): "flat 1-D shards",
    ("optim=adafactor", "optim.relative_step=true"): "set optim.lr=null",
    ("optim=adafactor", "optim.relative_step=true", "optim.lr=null"): "use lr_scheduler=adafactor",
    ("optim=adafactor", "optim.relative_step=true", "optim.lr=null", "lr_scheduler=adafactor",
     "optim.unet_lr=1e-5"): "would ignore optim.unet_lr",
    ("optim=adafactor", "lr_scheduler=adafactor"): "relative_step=true optim.lr=null",
    ("optim=adamw8bit", "strategy=fsdp"): "FSDP",
    ("optim=prodigy", "strategy=deepspeed_stage_3"): "use strategy=ddp",
    ("optim=adamw8bit", "optim.is_paged=true"): "CUDA only",
    ("optim=lion", "optim.use_triton=true"): "CUDA only",
}  # fmt: skip


@pytest.mark.parametrize("overrides", list(REFUSED), ids=lambda o: " ".join(o))
def test_combinations_that_cannot_train_are_refused_in_one_line(overrides):
    cfg = compose_config("train", [*BASE, *overrides])
    with pytest.raises(ConfigError, match=REFUSED[overrides]) as refused:
        check_optimizer(cfg)
    assert "\n" not in str(refused.value)


@pytest.mark.parametrize(
    "overrides",
    [
        ("optim=adafactor", "optim.relative_step=true", "optim.lr=null", "lr_scheduler=adafactor"),
        ("optim=schedule_free_adamw", "lr_scheduler=constant", "strategy=fsdp"),
        (
            "experiment=demo_digits",
            "optim=schedule_free_adamw",
            "optim.warmup_steps=50",
            "~lr_scheduler.num_warmup_steps",
        ),
        ("optim=lion", "strategy=deepspeed_stage_2_offload"),
    ],
    ids=lambda o: " ".join(o),
)
def test_combinations_that_train_are_accepted(overrides):
    cfg = compose_config("train", [*BASE, *overrides])
    check_optimizer(cfg)


@pytest.mark.parametrize(
    ("command", "overrides", "scheduler"),
    [  # the trials of lf-train -m optim=adamw,schedule_free_adamw: each composes its own optimizer's choice
        ("train", ["optim=adamw"], "transformers.get_constant_schedule_with_warmup"),
        ("train", ["optim=schedule_free_adamw"], "transformers.get_constant_schedule"),
        ("train", ["optim=schedule_free_adamw", "experiment=dreambooth"], "transformers.get_constant_schedule"),
        ("train_autoencoder", ["optim=schedule_free_adamw", "data.shards=x"], "transformers.get_constant_schedule"),
    ],
    ids=lambda o: " ".join(o) if isinstance(o, list) else o,
)
def test_a_schedule_free_optimizer_chooses_the_constant_scheduler_unless_one_is_given(
    command, overrides, scheduler, caplog
):
    cfg = compose_config(command, ["trainer.accelerator=cpu", *overrides])
    assert cfg.lr_scheduler._target_ == scheduler
    check_optimizer(cfg)
    with caplog.at_level(logging.INFO, logger="trainer.cli.fit_run"):
        log_own_schedule(cfg)  # the run's one line about it
    said = [r.getMessage() for r in caplog.records if "lr_scheduler=constant" in r.getMessage()]
    assert len(said) == (0 if cfg.optim._target_ == "torch.optim.AdamW" else 1), said


def test_the_autoencoder_trains_with_a_schedule_free_optimizer_and_ends_on_its_evaluation_weights(tmp_path):
    """lf-train-autoencoder optim=schedule_free_adamw: the module switches the optimizer to its training weights
    before each batch (schedulefree refuses a step otherwise) and to its evaluation weights after each step."""
    import lightning as L

    cfg = compose_config("train_autoencoder", ["data.shards=x", "optim=schedule_free_adamw", "optim.warmup_steps=1"])
    torch.manual_seed(0)
    module = instantiate(cfg.autoencoder, **optimizer_factories(cfg))
    pixels = torch.utils.data.DataLoader([{"pixels": torch.rand(2, 3, 32, 32) * 2 - 1} for _ in range(3)], None)
    trainer = L.Trainer(max_steps=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)  # fmt: skip
    trainer.fit(module, train_dataloaders=pixels)
    optimizer = trainer.optimizers[0]
    assert trainer.global_step == 3 and optimizer.param_groups[0]["train_mode"] is False
    weights = {name: p.detach().clone() for name, p in module.vae.named_parameters()}
    optimizer.train()  # the training point y differs from the evaluation point x the module holds
    assert any(not torch.equal(weights[name], p) for name, p in module.vae.named_parameters())
