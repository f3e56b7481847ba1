"""What a user who sets nothing gets: on CUDA bf16, a compiled UNet, a fused AdamW step and TF32; on
CPU plain float32; each one a setting. The UNet compiles with no graph break; the DeepSpeed configs
carry the overlap and bucket settings."""

from __future__ import annotations

import pytest
import torch
from hydra.utils import instantiate

from tests.conftest import compose_config
from trainer.cli.hydra_app import optimizer_factories

BASE = ["data.train_dir=x", "output_dir=o"]


@pytest.fixture
def cuda(monkeypatch):
    """Pretend a CUDA GPU is present (for resolving the defaults; nothing runs on it). diffusers is imported
    first: with bitsandbytes installed (latentforge[lowbit]) it imports it, which loads its CUDA kernels when
    CUDA seems present."""
    import diffusers.models  # noqa: F401

    def make(bf16: bool = True) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)

    return make


def defaults(*overrides: str) -> tuple[str, bool, bool]:
    cfg = compose_config("train", [*BASE, *overrides])
    return cfg.trainer.precision, cfg.model.compile_unet, cfg.optim.fused


def test_cpu_defaults_are_plain_float32():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert defaults() == ("32-true", False, False)


def test_cuda_defaults_are_bf16_compiled_and_fused(cuda):
    cuda(bf16=True)
    assert defaults() == ("bf16-mixed", True, True)
    optimizer = optimizer_factories(compose_config("train", BASE))["optimizer"](
        params=[torch.nn.Parameter(torch.zeros(2))]
    )
    assert optimizer.defaults["fused"] is True
    assert defaults("trainer.accelerator=cpu") == ("32-true", False, False), "an explicit CPU run on a GPU machine"
    assert defaults("model.compile_unet=false", "optim.fused=false", "trainer.precision=32-true") == (
        "32-true", False, False,
    ), "each default is a setting"  # fmt: skip


def test_a_gpu_without_bf16_gets_fp16_and_no_fused_step_under_clipping(cuda):
    cuda(bf16=False)
    assert defaults() == ("16-mixed", True, False)  # the fused step unscales after clipping would run
    assert defaults("trainer.gradient_clip_val=null") == ("16-mixed", True, True)


def test_tf32_is_set_for_cuda_runs_only(cuda, monkeypatch):
    from trainer.strategies.gpu_defaults import apply_matmul_precision

    calls = []
    monkeypatch.setattr(torch, "set_float32_matmul_precision", calls.append)
    apply_matmul_precision(compose_config("train", [*BASE, "trainer.accelerator=cpu"]))
    assert calls == []
    cuda()
    apply_matmul_precision(compose_config("train", BASE))
    assert calls == ["high"]


SD_SHAPED = {  # SD 1.5's block types and attention layout, narrow: the code paths compile sees on a GPU
    "sample_size": 8, "in_channels": 4, "out_channels": 4, "layers_per_block": 1,
    "block_out_channels": [32, 32, 64, 64], "norm_num_groups": 8, "cross_attention_dim": 32, "attention_head_dim": 8,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}  # fmt: skip


@pytest.mark.slow  # torch.compile of a UNet: about 30 s on 2 cores (60+ s when they are busy)
@pytest.mark.parametrize("lora", [False, True])
def test_the_unet_compiles_with_no_graph_break(lora):
    from diffusers import UNet2DConditionModel

    from trainer.lora.adapters import LoraSettings, add_lora

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**SD_SHAPED)
    if lora:
        add_lora(unet, LoraSettings(rank=4))
    sample, t, text = torch.randn(2, 4, 16, 16), torch.tensor([10, 500]), torch.randn(2, 8, 32)
    explanation = torch._dynamo.explain(unet)(sample, t, encoder_hidden_states=text)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


@pytest.mark.slow  # torch.compile of a UNet
def test_the_sdxl_unet_compiles_with_no_graph_break_under_gradient_checkpointing():
    """SDXL's conditioning (``text_time``: the pooled embedding and six time_ids through ``added_cond_kwargs``)
    and the gradient checkpointing ``model=sdxl`` turns on stay in one graph: the GPU recipe's compile holds."""
    torch.manual_seed(0)
    unet = instantiate(compose_config("train", ["model=sdxl_tiny"]).model.unet)
    unet.enable_gradient_checkpointing()
    unet.train()
    added = {"text_embeds": torch.randn(2, 32), "time_ids": torch.tensor([[32.0, 32, 0, 0, 32, 32]] * 2)}
    sample, t, text = torch.randn(2, 4, 8, 8), torch.tensor([10, 500]), torch.randn(2, 8, 64)
    explanation = torch._dynamo.explain(unet)(sample, t, encoder_hidden_states=text, added_cond_kwargs=added)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


def test_attention_runs_through_sdpa():
    """diffusers' default processor is PyTorch's scaled_dot_product_attention (flash attention on CUDA)."""
    from diffusers import UNet2DConditionModel
    from diffusers.models.attention_processor import AttnProcessor2_0

    unet = UNet2DConditionModel(**SD_SHAPED)
    assert {type(p) for p in unet.attn_processors.values()} == {AttnProcessor2_0}


@pytest.mark.parametrize("stage", ["1", "2", "2_offload", "3"])
def test_deepspeed_configs_overlap_communication_with_large_buckets(stage):
    cfg = compose_config("train", [*BASE, f"strategy=deepspeed_stage_{stage}"])
    zero = instantiate(cfg.trainer.strategy).config["zero_optimization"]
    assert zero["reduce_bucket_size"] >= 2e8
    if stage != "1":
        assert zero["overlap_comm"] is True and zero["contiguous_gradients"] is True
