"""``lf-train plan=true``: the memory plan of the run a config describes, without training it.

The module is built as the run would build it (``cfg.model``: the UNet, LoRA adapters, frozen blocks, trained
text encoders), but on the meta device (``torch.device("meta")``): shapes and dtypes only, so an SDXL plan takes
seconds and no memory. A pretrained part (``model=pretrained`` and the DreamBooth recipes) is built from its
config alone: ``model.pretrained``'s ``*/config.json``, or with ``plan.base=sdxl`` (``sd1``, ``sd2``, ...) the
standard configs in ``conf/base_models/`` when the weights are not on this machine. The data is not needed:
values under ``data`` left ``???`` stay so. The activations are those of one UNet forward on the meta device at
``plan.batch_size`` (default ``data.batch_size``; DreamBooth with a class prompt: twice, instance and class) and
``plan.latent_size`` (default the UNet's ``sample_size``) (:mod:`trainer.memory.activations`).

A real run logs the same table when it starts (:func:`log_plan`), from its own module.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from lf_common.errors import ConfigError
from trainer.memory.plan import MemoryPlan, OptimizerSetup, RunSetup, memory_plan
from trainer.memory.report import PlanContext, plan_table
from trainer.strategies.optimizer_support import optimizer_family
from trainer.strategies.precision import normalized_precision, strategy_kind

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)
PRETRAINED_PART = "trainer.interop.pretrained.pretrained_part"
PRETRAINED_UNET = "trainer.interop.pretrained.pretrained_unet"
PRETRAINED_SCHEDULER = "trainer.interop.pretrained.pretrained_noise_scheduler"
TOKENIZER_PLACEHOLDER = "not loaded by the plan"
SHARD_TEXT_ENCODERS = "trainer.modules.text_encoder_training.shard_text_encoders"  # model.train_text_encoder's


def run_setup(cfg: DictConfig) -> RunSetup:
    """The precision, strategy, ranks, optimizer and EMA of a ``train`` config."""
    trainer = cfg.trainer
    strategy = trainer.get("strategy", "auto")
    kind = strategy_kind(strategy)
    zero = OmegaConf.select(trainer, "strategy.config.zero_optimization", default=None) or {}
    devices = trainer.get("devices", 1)
    world = cfg.plan.get("world_size") or (devices if isinstance(devices, int) else 1) * int(trainer.num_nodes)
    optim = cfg.optim
    family = optimizer_family(str(optim.get("_target_", "")))
    first_moment = (
        optim.get("beta1") is not None if family == "adafactor" else float((optim.get("betas") or [0.9])[0]) > 0
    )
    return RunSetup(
        precision=normalized_precision(trainer.get("precision", "32-true")),
        strategy=kind,
        world_size=int(world) if kind != "single" else 1,
        zero_stage=int(zero.get("stage", 0)) if kind == "deepspeed" else 0,
        offload_optimizer=kind == "deepspeed" and zero.get("offload_optimizer") is not None,
        optimizer=OptimizerSetup(family, first_moment, int(optim.get("min_8bit_size") or 4096)),
        ema=OmegaConf.select(cfg, "callbacks.ema") is not None,
        ema_on_host=OmegaConf.select(cfg, "callbacks.ema.device", default=None) == "cpu",
    )


def part_configs(cfg: DictConfig) -> dict[str, dict[str, Any]]:
    """The configs of the pretrained parts the plan builds: ``plan.base``'s standard ones, else
    ``model.pretrained``'s ``<part>/config.json`` (and ``scheduler/scheduler_config.json``).

    Raises:
        ConfigError: neither is there (the fix names ``plan.base``).
    """
    import json
    from pathlib import Path

    from trainer.interop.model_types import BY_NAME

    base = cfg.plan.get("base")
    if base:
        if base not in BY_NAME or not BY_NAME[base].has_standard_configs:
            known = ", ".join(name for name, row in BY_NAME.items() if row.has_standard_configs)
            raise ConfigError(f"plan.base={base}: no standard configs of that name; use one of {known}")
        return BY_NAME[base].configs()
    given = OmegaConf.select(cfg, "model.pretrained", default=None, throw_on_missing=False)
    if given in (None, "???"):
        raise ConfigError("model.pretrained is not set: give the folder, or plan a standard base: plan.base=sd1|sdxl")
    folder = Path(str(given))
    configs = {}
    for part in ("unet", "text_encoder", "text_encoder_2", "scheduler"):
        for name in ("config.json", "scheduler_config.json"):
            if (folder / part / name).is_file():
                configs[part] = json.loads((folder / part / name).read_text(encoding="utf-8"))
    if "unet" not in configs:
        raise ConfigError(
            f"model.pretrained={folder}: no unet/config.json there; plan a base without its weights with "
            "plan.base=sd1, sd2 or sdxl"
        )
    return configs


def meta_model_config(cfg: DictConfig) -> DictConfig:
    """``cfg.model`` with each pretrained part replaced by a build from its config (no weights read), the
    tokenizers by a placeholder, and compilation off."""
    model = OmegaConf.to_container(cfg.model, resolve=False)
    assert isinstance(model, dict)
    uses_pretrained = any(
        isinstance(node, dict) and node.get("_target_") in (PRETRAINED_UNET, PRETRAINED_PART, PRETRAINED_SCHEDULER)
        for node in model.values()
    )
    configs = part_configs(cfg) if uses_pretrained else {}
    for key, node in list(model.items()):
        if not isinstance(node, dict):
            continue
        target = node.get("_target_")
        if target == PRETRAINED_UNET:
            model[key] = {"_target_": "diffusers.UNet2DConditionModel.from_config", "config": configs["unet"]}
        elif target == PRETRAINED_SCHEDULER:
            overrides = {k: v for k, v in node.items() if k not in ("_target_", "path", "allow_prediction_type_change")}
            overrides = {k: v for k, v in overrides.items() if v is not None}
            model[key] = {
                "_target_": "diffusers.DDPMScheduler.from_config",
                "config": {**configs.get("scheduler", {}), **overrides},
            }
        elif target == PRETRAINED_PART and "tokenizer" in str(node.get("subfolder")):
            model[key] = TOKENIZER_PLACEHOLDER
        elif target == SHARD_TEXT_ENCODERS:  # the encoders model.train_text_encoder trains, from their configs
            model[key] = _planned_text_encoders(configs) if model.get("train_text_encoder") else None
        elif target == PRETRAINED_PART:
            model[key] = {
                "_target_": "trainer.cli.plan_run.text_encoder_from_config",
                "class_name": node["class_name"],
                "config": configs[str(node["subfolder"])],
            }
    model["compile_unet"] = False
    if cfg.plan.get("base") and "pretrained" in model:
        model["pretrained"] = str(cfg.plan.base)  # kept in the hyperparameters only; no part reads it now
    whole = OmegaConf.to_container(cfg, resolve=False)
    assert isinstance(whole, dict)
    whole.update(model=model, data=_data_placeholders(cfg))
    return OmegaConf.create(whole).model


def _planned_text_encoders(configs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """``model.text_encoders`` for the plan: the encoders built from their configs, the tokenizers placeholders.

    Raises:
        ConfigError: no text encoder config (a model without ``model.pretrained`` and no ``plan.base``).
    """
    if "text_encoder" not in configs:
        raise ConfigError("model.train_text_encoder=true: the plan builds the text encoder from model.pretrained's "
                          "config; use model=pretrained, or plan a standard base: plan.base=sd1|sdxl")  # fmt: skip
    parts: dict[str, Any] = {"_target_": "trainer.modules.text_encoder_training.TextEncoderParts"}
    for name, class_name in (("text_encoder", "CLIPTextModel"), ("text_encoder_2", "CLIPTextModelWithProjection")):
        if name in configs:
            parts[name] = {"_target_": "trainer.cli.plan_run.text_encoder_from_config",
                           "class_name": f"transformers.{class_name}", "config": configs[name]}  # fmt: skip
            parts[name.replace("text_encoder", "tokenizer")] = TOKENIZER_PLACEHOLDER
    return parts


def _data_placeholders(cfg: DictConfig) -> dict[str, Any]:
    """``cfg.data`` with its ``???`` values given a placeholder (the model's config may refer to them)."""
    data = OmegaConf.to_container(cfg.data, resolve=False)
    assert isinstance(data, dict)
    return {key: ("plan" if value == "???" else value) for key, value in data.items()}


def text_encoder_from_config(class_name: str, config: dict[str, Any]) -> torch.nn.Module:
    """A transformers text encoder built from its config (no weights): ``class_name`` as ``transformers.X``."""
    from hydra.utils import get_class

    cls = get_class(class_name)
    return cls(cls.config_class(**config))


def meta_module(cfg: DictConfig) -> torch.nn.Module:
    """The run's LightningModule built on the meta device (no optimizer: the plan steps nothing)."""
    import torch

    from trainer.modules.param_groups import split_optim_config

    _, settings = split_optim_config(cfg.optim)
    model = meta_model_config(cfg)
    with torch.device("meta"):
        return instantiate(model, optimizer=None, lr_scheduler=None, param_groups=settings)


def compute_dtype(precision: str) -> torch.dtype:
    """The dtype the UNet computes in under ``precision``."""
    import torch

    if precision.startswith("bf16"):
        return torch.bfloat16
    return torch.float16 if precision.startswith("16") else torch.float32


def plan_context(cfg: DictConfig, module: Any, setup: RunSetup) -> PlanContext:
    """The batch size, latent size, checkpointing and LoRA of the run."""
    batch = cfg.plan.get("batch_size") or int(cfg.data.get("batch_size") or 1)
    if cfg.plan.get("batch_size") is None and cfg.data.get("class_prompt"):
        batch *= 2  # DreamBooth with prior preservation: an instance and a class batch per step
    unet = module.unet
    latent = int(cfg.plan.get("latent_size") or unet.config.sample_size)
    checkpointing = bool(getattr(unet, "is_gradient_checkpointing", False))
    return PlanContext(setup, int(batch), latent, checkpointing, module.lora is not None)


def step_activations(module: Any, context: PlanContext) -> int:
    """The activations of one step (:func:`trainer.memory.activations.saved_activation_bytes`) on a meta copy
    of the module's UNet, in the precision's compute dtype; under ``*-mixed`` autocast also keeps a 16-bit copy
    of every matrix and convolution weight it multiplies with, for the backward pass."""
    import torch

    from trainer.memory.activations import saved_activation_bytes
    from trainer.memory.tensors import meta_copy

    precision = context.setup.precision
    dtype = compute_dtype(precision)
    unet = torch.nn.Module.to(meta_copy(module.unet), dtype)  # not diffusers' to(): it warns about the cast
    activations = saved_activation_bytes(unet, context.batch_size, context.latent_size, dtype)
    if precision.endswith("-mixed") and dtype != torch.float32:
        activations += 2 * sum(p.numel() for p in module.unet.parameters() if p.dim() >= 2)
    return activations


def plan_of(cfg: DictConfig, module: Any) -> tuple[MemoryPlan, PlanContext]:
    """The memory plan of ``cfg``'s run with ``module`` (real or on the meta device)."""
    from trainer.memory.tensors import model_tensors

    setup = run_setup(cfg)
    context = plan_context(cfg, module, setup)
    plan = memory_plan(model_tensors(module), setup, step_activations(module, context))
    return plan, context


def run_plan(cfg: DictConfig) -> dict[str, Any]:
    """Print the plan of ``cfg``'s run (``plan=true``) and return it.

    Returns:
        ``plan`` (:class:`~trainer.memory.plan.MemoryPlan`), ``table`` (the text printed), ``fits`` (``None``
        without ``plan.device_memory_gb``).
    """
    plan, context = plan_of(cfg, meta_module(cfg))
    budget = cfg.plan.get("device_memory_gb")
    table = plan_table(plan, context, budget)
    print(table, flush=True)
    fits = None if budget is None else plan.total <= float(budget) * 1024**3
    return {"plan": plan, "table": table, "fits": fits}


def log_plan(cfg: DictConfig, module: Any) -> None:
    """Log the plan of a run that starts now (its own module), as ``plan=true`` prints it; a failure to plan
    is logged and the run goes on."""
    if "plan" not in cfg:
        return
    try:
        plan, context = plan_of(cfg, module)
    except Exception as error:  # the plan informs; it never stops a run
        log.warning("memory plan: not available (%s)", error)
        return
    log.info("%s", plan_table(plan, context, cfg.plan.get("device_memory_gb")))
