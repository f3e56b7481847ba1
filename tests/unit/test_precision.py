"""Precision × strategy × accelerator: what cannot train is refused when the config is composed."""

import pytest
import torch

from lf_common.errors import ConfigError
from tests.conftest import compose_config
from trainer.cli.train import run_train
from trainer.strategies.precision import check_precision, precision_problem, strategy_kind

STRATEGIES = ["single", "ddp", "fsdp", "deepspeed_stage_1", "deepspeed_stage_2", "deepspeed_stage_2_offload",
              "deepspeed_stage_3"]  # fmt: skip


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_each_strategy_config_is_recognised(strategy):
    cfg = compose_config("train", ["data.train_dir=x", "output_dir=o", f"strategy={strategy}"])
    assert strategy_kind(cfg.trainer.strategy) == strategy.split("_stage")[0]


@pytest.mark.parametrize("strategy", ["single", "ddp", "fsdp", "deepspeed"])
@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed", "bf16-true", "32", "bf16"])
def test_cpu_precisions_are_accepted(strategy, precision):
    assert precision_problem(precision, strategy, "cpu") is None


@pytest.mark.parametrize("strategy", ["single", "ddp", "fsdp", "deepspeed"])
def test_fp16_on_cpu_is_refused_with_the_alternative(strategy):
    problem = precision_problem("16-mixed", strategy, "cpu")
    assert "needs a CUDA GPU" in problem and "bf16-mixed" in problem
    assert precision_problem("16", strategy, "cpu") == problem, "Lightning's alias 16 means 16-mixed"
    if strategy == "deepspeed":
        assert "DeepSpeed's fp16 mode" in problem


def test_fp16_weights_without_loss_scaling_are_refused_everywhere():
    for accelerator in ("cpu", "cuda"):
        problem = precision_problem("16-true", "single", accelerator)
        assert "no loss scaling" in problem and "16-mixed" in problem


def test_unshipped_precisions_are_refused():
    assert "64-true is not supported" in precision_problem("64-true", "ddp", "cpu")
    assert "transformer-engine is not supported" in precision_problem("transformer-engine", "single", "cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.gpu
def test_fp16_is_accepted_on_cuda():
    for strategy in ("single", "ddp", "fsdp", "deepspeed"):
        assert precision_problem("16-mixed", strategy, "cuda") is None


def test_the_train_command_refuses_before_building_anything(tmp_path):
    overrides = ["data.train_dir=/nonexistent", f"output_dir={tmp_path}", "trainer.accelerator=cpu"]
    with pytest.raises(ConfigError, match=r"^trainer.precision=16-mixed \(DeepSpeed's fp16 mode\) needs a CUDA GPU"):
        run_train(compose_config("train", [*overrides, "strategy=deepspeed_stage_2", "trainer.precision=16-mixed"]))
    assert not any(tmp_path.iterdir()), "nothing was written"


def test_check_reads_the_composed_trainer_config():
    cfg = compose_config("train", ["data.train_dir=x", "output_dir=o", "trainer.accelerator=cpu"])
    check_precision(cfg.trainer)  # the default is accepted
    cfg.trainer.precision = "16-true"
    with pytest.raises(ConfigError, match="16-true"):
        check_precision(cfg.trainer)


def test_a_gpu_accelerator_on_a_machine_without_cuda_is_one_line_not_a_traceback(monkeypatch):
    monkeypatch.setattr("trainer.strategies.precision._cuda_available", lambda: False)
    problem = precision_problem("bf16-mixed", "ddp", "cuda")
    assert "has none" in problem and "trainer.accelerator=cpu" in problem and "\n" not in problem
    monkeypatch.setattr("trainer.strategies.precision._cuda_available", lambda: True)
    monkeypatch.setattr("trainer.strategies.precision._cuda_has_bf16", lambda: True)
    assert precision_problem("bf16-mixed", "ddp", "cuda") is None
