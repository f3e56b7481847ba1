"""The settings a user who sets nothing gets: the fastest safe ones on a CUDA GPU, plain ones on a CPU.

The configs call these through OmegaConf resolvers, with the accelerator they will run on, so each
default stays visible in the YAML and any of them is turned off by setting it:

| setting | on CUDA | on CPU | config key |
| --- | --- | --- | --- |
| precision | ``bf16-mixed`` (``16-mixed`` on a GPU without bf16) | ``32-true`` | ``trainer.precision`` |
| ``torch.compile`` of the UNet | on | off | ``model.compile_unet`` |
| fused AdamW step | on (``foreach`` under ``16-mixed`` with clipping) | off | ``optim.fused`` |
| TF32 matmuls and convolutions | on (``float32_matmul_precision: high``) | — | ``float32_matmul_precision`` |
| precompute's image-decoding processes | up to 8 | 0 | ``num_workers`` (lf-precompute) |

SDPA attention (flash attention on CUDA in bf16/fp16) is diffusers' default processor already.

torch is imported by the functions that ask it (when a value is resolved), not by this module: the
commands register the resolvers before composing, and ``--help`` or a config error imports no torch.
"""

from __future__ import annotations

import os
from typing import Any

from omegaconf import OmegaConf

from trainer.strategies.precision import normalized_precision, resolved_accelerator


def on_cuda(accelerator: Any = "auto") -> bool:
    """Whether a run on ``accelerator`` (``trainer.accelerator``) runs on a CUDA GPU."""
    return resolved_accelerator(accelerator) == "cuda"


def default_precision(accelerator: Any = "auto") -> str:
    """``bf16-mixed`` on a CUDA GPU with bf16, ``16-mixed`` on one without, ``32-true`` elsewhere."""
    if not on_cuda(accelerator):
        return "32-true"
    import torch

    return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"


def fused_optimizer(accelerator: Any = "auto", precision: Any = "32-true", gradient_clip_val: Any = None) -> bool:
    """A fused AdamW step on CUDA, except under ``16-mixed`` with gradient clipping: the fused step
    unscales the gradients itself, after clipping would have run on scaled ones."""
    if not on_cuda(accelerator):
        return False
    return not (normalized_precision(precision) == "16-mixed" and gradient_clip_val)


def apply_matmul_precision(cfg: Any) -> None:
    """``torch.set_float32_matmul_precision(cfg.float32_matmul_precision)`` for a run on CUDA (``high``:
    TF32 on Ampere and newer). CPU runs keep full float32 matmuls, so their results do not change."""
    if on_cuda(cfg.trainer.get("accelerator", "auto")):
        import torch

        torch.set_float32_matmul_precision(cfg.get("float32_matmul_precision") or "highest")
        torch.backends.cudnn.allow_tf32 = cfg.get("float32_matmul_precision") in ("high", "medium")


def loader_workers(device: Any = "auto") -> int:
    """Image-decoding processes for precompute: none on a CPU (they would take the cores the
    encoders use), up to 8 beside a CUDA GPU."""
    return min(8, os.cpu_count() or 1) if on_cuda(device) else 0


def register_resolvers() -> None:
    """``${lf_on_cuda:ACC}``, ``${lf_default_precision:ACC}``, ``${lf_fused_optimizer:ACC,PRECISION,CLIP}``,
    ``${lf_loader_workers:DEVICE}``."""
    OmegaConf.register_new_resolver("lf_on_cuda", on_cuda, replace=True)
    OmegaConf.register_new_resolver("lf_default_precision", default_precision, replace=True)
    OmegaConf.register_new_resolver("lf_fused_optimizer", fused_optimizer, replace=True)
    OmegaConf.register_new_resolver("lf_loader_workers", loader_workers, replace=True)
