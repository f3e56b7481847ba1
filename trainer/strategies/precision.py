"""Which precision trains under which strategy on which accelerator: checked when the config is
composed, so a combination that cannot train is refused in one line that says why and what to use.

What each shipped precision means for the UNet (``LatentDiffusion._predict`` casts its inputs to
the dtype of its weights, so each of these feeds it what it holds):

| ``trainer.precision`` | single, DDP, FSDP | DeepSpeed |
| --- | --- | --- |
| ``32-true`` | float32 | float32 |
| ``bf16-mixed`` | float32 weights, bf16 autocast | DeepSpeed's bf16 mode: bf16 weights, float32 master copy |
| ``bf16-true`` | bf16 weights, no master copy | as ``bf16-mixed`` |
| ``16-mixed`` (CUDA) | float32 weights, fp16 autocast, loss scaling | DeepSpeed's fp16 mode, dynamic loss scaling |
"""

from __future__ import annotations

from typing import Any

from lf_common.errors import ConfigError

SHIPPED_PRECISIONS = ("32-true", "bf16-mixed", "bf16-true", "16-mixed")
ALIASES = {"32": "32-true", "16": "16-mixed", "bf16": "bf16-mixed"}


def normalized_precision(precision: Any) -> str:
    """Lightning's spelling of ``precision`` (``32`` -> ``32-true``, ``bf16`` -> ``bf16-mixed``)."""
    text = str(precision)
    return ALIASES.get(text, text)


def strategy_kind(strategy: Any) -> str:
    """``single``, ``ddp``, ``deepspeed`` or ``fsdp`` for a ``trainer.strategy`` value (a name or a config)."""
    target = strategy.get("_target_", "") if hasattr(strategy, "get") else str(strategy or "auto")
    name = target.rsplit(".", 1)[-1].lower()
    for kind in ("deepspeed", "fsdp", "ddp"):
        if kind in name:
            return kind
    return "single"


def resolved_accelerator(accelerator: Any) -> str:
    """``cuda`` or ``cpu`` (or what was named) for a ``trainer.accelerator`` value; ``auto`` picks CUDA when present."""
    name = str(accelerator or "auto").lower()
    if name in ("gpu", "cuda"):
        return "cuda"
    if name == "auto":
        import torch  # here, not on import: the cheap refusals and --help of the commands need no torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def precision_problem(precision: Any, strategy: str, accelerator: str) -> str | None:
    """Why ``precision`` cannot train under ``strategy`` (a :func:`strategy_kind`) on ``accelerator``, or ``None``."""
    precision = normalized_precision(precision)
    if precision == "16-true":
        return (
            "trainer.precision=16-true keeps fp16 weights with no loss scaling (small updates vanish, "
            "activations overflow); use trainer.precision=bf16-true, bf16-mixed or 16-mixed"
        )
    if precision not in SHIPPED_PRECISIONS:
        return f"trainer.precision={precision} is not supported; use one of {', '.join(SHIPPED_PRECISIONS)}"
    if precision == "16-mixed" and accelerator != "cuda":
        engine = "DeepSpeed's fp16 mode" if strategy == "deepspeed" else "fp16 autocast with loss scaling"
        return f"trainer.precision=16-mixed ({engine}) needs a CUDA GPU; on {accelerator} use bf16-mixed"
    if accelerator == "cuda" and not _cuda_available():
        return (
            "trainer.accelerator asks for a CUDA GPU and this machine has none (torch.cuda.is_available() is "
            "False); use trainer.accelerator=cpu, or run on a GPU machine (lf-train plan=true plans one from here)"
        )
    if precision.startswith("bf16") and accelerator == "cuda" and not _cuda_has_bf16():
        return (
            f"trainer.precision={precision}: this GPU ({_cuda_device_name()}) has no bf16; "
            "use trainer.precision=16-mixed"
        )
    return None


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _cuda_has_bf16() -> bool:
    import torch

    return torch.cuda.is_bf16_supported()


def _cuda_device_name() -> str:
    import torch

    return torch.cuda.get_device_name()


def check_precision(trainer_cfg: Any) -> None:
    """Refuse a ``trainer`` config whose precision cannot train with its strategy and accelerator.

    Raises:
        ConfigError: one line saying why and what to use instead.
    """
    problem = precision_problem(
        trainer_cfg.get("precision", "32-true"),
        strategy_kind(trainer_cfg.get("strategy", "auto")),
        resolved_accelerator(trainer_cfg.get("accelerator", "auto")),
    )
    if problem:
        raise ConfigError(problem)
