"""The module's parameters as the plan needs them (:class:`~trainer.memory.plan.ModelTensors`), and the bytes a
built run actually holds: the sums the plan's figures are checked against.

Both work on a module on the meta device (``torch.device("meta")``: shapes and dtypes, no storage) and on a
real one.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from trainer.memory.plan import ModelTensors
from trainer.memory.torch_private import drop_compiled_forward


def model_tensors(module: torch.nn.Module, trained: Iterable[torch.Tensor] | None = None) -> ModelTensors:
    """The shapes of ``module``'s trained parameters and the elements of its frozen ones.

    Args:
        module: the LightningModule (UNet, adapters, trained text encoders), real or on the meta device.
        trained: the parameters the optimizer steps, in its order (default: those with ``requires_grad``).
    """
    params = list(module.parameters())
    trained = [p for p in params if p.requires_grad] if trained is None else list(trained)
    ids = {id(p) for p in trained}
    frozen = sum(p.numel() for p in params if id(p) not in ids)
    return ModelTensors(tuple(tuple(p.shape) for p in trained), frozen)


def _storages(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages of ``tensors`` (a tensor shared by several, as bitsandbytes' quantization
    maps, counts once)."""
    seen: dict[int, int] = {}
    for tensor in tensors:
        storage = tensor.untyped_storage()
        seen[storage.data_ptr() or id(tensor)] = storage.nbytes()
    return sum(seen.values())


def held_bytes(module: torch.nn.Module, optimizer: Any = None, averaged: Iterable[torch.Tensor] = ()) -> dict[str, int]:
    """Bytes a real run holds now, as sums of actual tensor sizes: ``weights`` (parameters), ``gradients``
    (``.grad`` of each parameter), ``optimizer state`` (every tensor in the optimizer's state, on any device),
    ``EMA`` (the EMA callback's average).

    Args:
        module: the trained module.
        optimizer: a torch optimizer after at least one step (its state exists from then), or ``None``.
        averaged: the EMA callback's tensors (``EMA.average``), or none.
    """
    params = list(module.parameters())
    state: list[torch.Tensor] = []
    if optimizer is not None:
        for per_param in optimizer.state.values():
            state += [v for v in per_param.values() if isinstance(v, torch.Tensor)]
    return {
        "weights": _storages(params),
        "gradients": _storages(p.grad for p in params if p.grad is not None),
        "optimizer state": _storages(state),
        "EMA": _storages(averaged),
    }


def meta_copy(module: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``module`` on the meta device, made without copying its weights (real or meta), with the same
    trainable parameters, checkpointing and adapters; a compiled forward is not copied."""
    import copy

    memo: dict[int, Any] = {}
    for tensor in [*module.parameters(), *module.buffers()]:
        meta = torch.empty_like(tensor, device="meta")
        is_param = isinstance(tensor, torch.nn.Parameter)
        memo[id(tensor)] = torch.nn.Parameter(meta, requires_grad=tensor.requires_grad) if is_param else meta
    clone = copy.deepcopy(module, memo)
    for sub in clone.modules():
        drop_compiled_forward(sub)
    return clone
