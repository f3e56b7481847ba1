"""PyTorch's private names that :mod:`trainer.memory` uses, and why no public API does the job.

* ``torch.utils._python_dispatch.TorchDispatchMode`` and ``torch.utils._pytree.tree_flatten``
  (:mod:`trainer.memory.measure`): seeing every storage an operation creates, as it is created, is what a
  dispatch mode is for; no public hook reports tensor allocations on the CPU (``torch.profiler``'s memory
  events are public but cost seconds per step and come without a usable order).
* ``torch.ops.aten._scaled_dot_product_flash_attention_for_cpu`` (:mod:`trainer.memory.activations`): on the
  meta device ``F.scaled_dot_product_attention`` takes the math path, which saves the whole attention matrix;
  this op is the fused kernel the CPU runs (and saves what GPU kernels save), and it has a meta implementation.
* ``nn.Module._compiled_call_impl`` (:func:`trainer.memory.tensors.meta_copy`): ``Module.compile`` keeps the
  compiled forward there, bound to the original module; a copy must drop it or it would call the original.
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from lf_common.upstream_contract import PrivateName

ADAPTER = "trainer/memory/torch_private.py"
__all__ = ["TorchDispatchMode", "drop_compiled_forward", "fused_cpu_attention", "tree_flatten"]


def fused_cpu_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, is_causal: bool,
                        scale: float | None) -> torch.Tensor:  # fmt: skip
    """Attention ``(B, heads, N, d)`` through the CPU's fused kernel (inputs, output and a log-sum-exp saved)."""
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(query, key, value, 0.0, is_causal, scale=scale)[0]


def drop_compiled_forward(module: torch.nn.Module) -> None:
    """Forget ``module.compile()``'s compiled forward (a copy's would call the original module)."""
    module._compiled_call_impl = None


CONTRACTS = (
    PrivateName("torch", "torch.utils._python_dispatch", "TorchDispatchMode", ADAPTER),
    PrivateName("torch", "torch.utils._pytree", "tree_flatten", ADAPTER),
    PrivateName("torch", "torch.ops.aten", "_scaled_dot_product_flash_attention_for_cpu", ADAPTER),
    PrivateName(
        "torch", "torch.nn.Module", "_compiled_call_impl", ADAPTER, kind="attribute", instance=lambda: torch.nn.Module()
    ),
)
