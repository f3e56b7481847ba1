"""Which optimizer trains under which strategy, precision and LR scheduler: checked when the config is
composed, so a combination that cannot train (or would silently train something else) is refused in one
line that says why and what works. ``docs/optimizers.md`` has the table.

The optimizer is known by its ``_target_`` (``conf/optim/*.yaml``); one this module does not know (a user's
own class) is not refused. What was run to establish each rule is listed in ``docs/optimizers.md``.
"""

from __future__ import annotations

import importlib.util
from typing import Any

from lf_common.errors import ConfigError
from trainer.strategies.precision import normalized_precision, resolved_accelerator, strategy_kind

CONSTANT_SCHEDULES = (None, "transformers.get_constant_schedule")
ADAFACTOR_SCHEDULE = "transformers.optimization.AdafactorSchedule"
SHARDED = ("fsdp", "deepspeed")


def optimizer_family(target: str) -> str:
    """``schedule_free``, ``adafactor``, ``bitsandbytes``, ``prodigy``, ``lion``, ``torch`` or ``other`` for an
    ``optim._target_``."""
    if target.startswith("schedulefree."):
        return "schedule_free"
    if target.rsplit(".", 1)[-1] == "Adafactor":
        return "adafactor"
    if target.startswith("bitsandbytes."):
        return "bitsandbytes"
    if target.startswith("prodigyopt."):
        return "prodigy"
    if target.startswith("lion_pytorch."):
        return "lion"
    return "torch" if target.startswith("torch.optim.") else "other"


def optimizer_problem(optim: Any, lr_scheduler: Any, strategy: str, precision: str, accelerator: str) -> str | None:
    """Why ``optim`` cannot train with this strategy, precision, accelerator and LR scheduler, or ``None``.

    Args:
        optim: the ``optim`` config (its ``_target_`` and keys).
        lr_scheduler: the ``lr_scheduler`` config, or ``None``.
        strategy: a :func:`~trainer.strategies.precision.strategy_kind`.
        precision: Lightning's spelling of ``trainer.precision``.
        accelerator: ``cpu`` or ``cuda``.
    """
    target = str(optim.get("_target_", ""))
    family = optimizer_family(target)
    scheduler = lr_scheduler.get("_target_") if lr_scheduler else None
    name = f"optim ({target})"
    if family == "schedule_free":
        if strategy == "deepspeed":
            return (
                f"{name} keeps its training and evaluation weights apart, but DeepSpeed steps its own float32 "
                "master copy and copies it into the model only after a step, so the evaluation weights would never "
                "reach the model: use strategy=ddp or fsdp, or optim=adamw"
            )
        if scheduler not in CONSTANT_SCHEDULES:
            return (
                f"{name} has no decay schedule and warms up itself (optim.warmup_steps); lr_scheduler ({scheduler}) "
                "would schedule it twice: use lr_scheduler=constant"
            )
        warmup = lr_scheduler.get("num_warmup_steps") if lr_scheduler else None
        if warmup is not None:  # an experiment's warm-up (demo_digits) merged into the constant schedule
            return (
                f"{name} warms up itself, but lr_scheduler.num_warmup_steps={warmup} (set by an experiment or the "
                f"command line) asks the constant schedule for a warm-up too: add optim.warmup_steps={warmup} "
                "~lr_scheduler.num_warmup_steps"
            )
    if family == "adafactor":
        if strategy in SHARDED:
            return (
                f"{name} factors each weight matrix's second moment by rows and columns, but {strategy} hands "
                "the optimizer flat 1-D shards, so it would keep Adam's memory and clip per shard: use strategy=ddp, "
                "or optim=adamw8bit / lion under FSDP and DeepSpeed"
            )
        if precision == "bf16-true":
            return (
                f"{name} keeps float32 state for bf16 weights, and a resume casts it to the weights' bf16 "
                "(torch's Optimizer.load_state_dict), so it would not continue where it stopped: use "
                "trainer.precision=bf16-mixed"
            )
        if optim.get("relative_step"):
            if optim.get("lr") is not None:
                return f"{name} with optim.relative_step=true computes its own step size: set optim.lr=null"
            if scheduler not in (None, ADAFACTOR_SCHEDULE):
                return (
                    f"{name} with optim.relative_step=true ignores any LR scheduler's value: use "
                    "lr_scheduler=adafactor (it logs Adafactor's own LR), or optim.relative_step=false with optim.lr"
                )
        elif optim.get("lr") is None:
            return f"{name} with optim.relative_step=false needs a fixed optim.lr (e.g. 1e-5)"
        elif scheduler == ADAFACTOR_SCHEDULE:
            return (
                "lr_scheduler=adafactor reports Adafactor's own step size: set optim.relative_step=true optim.lr=null"
            )
    if family == "bitsandbytes":
        # What no install fixes first, then the install.
        if optim.get("is_paged") and accelerator != "cuda":
            return f"optim.is_paged=true pages the state out of GPU memory (CUDA only): set false on {accelerator}"
        if strategy == "fsdp":
            return (
                f"{name} keeps block scales whose shapes are not the weights', which FSDP's optimizer-state gathering "
                "cannot reshape, so the first checkpoint would fail: use strategy=ddp or deepspeed_stage_1/2/3"
            )
        if importlib.util.find_spec("bitsandbytes") is None:
            return f"{name} needs bitsandbytes: pip install 'latentforge[lowbit]' (or bitsandbytes)"
    if family == "prodigy" and strategy in SHARDED:
        return (
            f"{name} estimates its step size from sums over all weights; under {strategy} each rank holds a shard, "
            "and prodigyopt's sharded mode (fsdp_in_use) all-reduces through a CUDA tensor and fails on a step with "
            "LR 0 (a warm-up's first): use strategy=ddp"
        )
    if family == "lion" and optim.get("use_triton") and accelerator != "cuda":
        return f"optim.use_triton=true runs Lion's step as a Triton kernel (CUDA only): on {accelerator} set false"
    return None


TEXTUAL_INVERSION_SHARDED = (
    "strategy={strategy}: textual inversion trains a few vectors beside a frozen model, nothing worth sharding, and "
    "its rows would be written from one shard; use strategy=ddp or deepspeed_stage_1/2"
)


def textual_inversion_problem(model: Any, strategy: Any) -> str | None:
    """Why a textual-inversion ``model`` config cannot train under ``strategy`` (FSDP, ZeRO-3), or ``None``."""
    if not hasattr(model, "get") or not model.get("textual_inversion"):
        return None
    kind = strategy_kind(strategy)
    stage = (
        (strategy.get("config") or {}).get("zero_optimization", {}).get("stage") if hasattr(strategy, "get") else None
    )
    if kind == "fsdp" or (kind == "deepspeed" and stage == 3):
        name = strategy.get("_target_", strategy) if hasattr(strategy, "get") else strategy
        return TEXTUAL_INVERSION_SHARDED.format(strategy=f"{name} (ZeRO stage {stage})" if stage else name)
    if kind == "deepspeed" and float(model.textual_inversion.get("train_fraction", 1.0)) < 1.0:
        return (
            "model.textual_inversion.train_fraction < 1 stops the rows by dropping their gradients, but DeepSpeed "
            "steps its own copy of them: use strategy=ddp, or train_fraction=1"
        )
    return None


def check_optimizer(cfg: Any) -> None:
    """Refuse a ``train`` config whose optimizer cannot train with its strategy, precision and LR scheduler, or
    whose per-part learning rates the optimizer would ignore.

    Raises:
        ConfigError: one line saying why and what to use instead.
    """
    trainer = cfg.trainer
    problem = optimizer_problem(
        cfg.optim,
        cfg.get("lr_scheduler"),
        strategy_kind(trainer.get("strategy", "auto")),
        normalized_precision(trainer.get("precision", "32-true")),
        resolved_accelerator(trainer.get("accelerator", "auto")),
    )
    if problem is None and cfg.optim.get("relative_step"):
        keys = ("unet_lr", "text_encoder_lr", "text_encoder_2_lr", "embedding_lr", "block_lr")
        given = [f"optim.{key}" for key in keys if cfg.optim.get(key) is not None]
        if given:
            problem = f"optim.relative_step=true: Adafactor sets its own step size and would ignore {', '.join(given)}"
    problem = problem or textual_inversion_problem(cfg.get("model"), trainer.get("strategy", "auto"))
    if problem:
        raise ConfigError(problem)
