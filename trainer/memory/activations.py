"""The activations of one training step, estimated by running the UNet's forward on the meta device.

On ``torch.device("meta")`` every operation computes only its output's shape and dtype, so a forward pass of
an SDXL UNet at 1024 px costs seconds of CPU and no memory. Autograd still records what each operation saves
for the backward pass; :func:`saved_activation_bytes` adds up those tensors (``torch.autograd.graph.
saved_tensors_hooks``), each storage once, parameters left out (they are the weights). That is what stays
alive between the forward and the backward pass: the bulk of a step's peak. The transients of single
operations and the backward's own gradient buffers come on top; ``tests/unit/test_memory_plan.py`` measures
the tolerance on CPU (``docs/memory.md`` states it).

With gradient checkpointing (diffusers' ``enable_gradient_checkpointing``: each resnet and transformer block
recomputed in the backward pass), a checkpointed block holds only its inputs until the backward pass, and
there recomputes its own activations, one block at a time: the estimate is what the rest of the network
saves, plus the blocks' inputs, plus the largest block's own activations.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch

from trainer.memory.diffusers_private import checkpointing_function, set_checkpointing_function
from trainer.memory.torch_private import fused_cpu_attention


class SavedBytes:
    """Counts the bytes autograd saves for backward, each storage once; parameters excluded.

    Attributes:
        total: bytes saved outside checkpointed blocks, plus the blocks' held inputs.
        largest_block: the most any one checkpointed block saves inside itself (recomputed in backward).
    """

    def __init__(self, parameters: set[int]) -> None:
        self.parameters = parameters
        self.total = 0
        self.largest_block = 0
        self._seen: set[int] = set()
        self._block: SavedBytes | None = None

    def add(self, tensor: torch.Tensor) -> None:
        """Count ``tensor`` unless it is a parameter or a storage counted already."""
        counter = self._block or self
        base = tensor._base if tensor._base is not None else tensor
        if id(base) in self.parameters or id(base) in counter._seen:
            return
        counter._seen.add(id(base))
        counter.total += base.numel() * base.element_size()

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        """The pack hook: count, and hand the tensor on unchanged."""
        self.add(tensor)
        return tensor

    def checkpointed(self, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run a checkpointed block: its tensor inputs are held, its own saves counted apart."""
        if self._block is not None:  # nested: the outer block counts it
            return function(*args, **kwargs)
        for value in [*args, *kwargs.values()]:
            if isinstance(value, torch.Tensor) and value.requires_grad:
                self.add(value)
        self._block = SavedBytes(self.parameters)
        try:
            output = function(*args, **kwargs)
        finally:
            block, self._block = self._block, None
        self.largest_block = max(self.largest_block, block.total)
        return output

    @property
    def estimate(self) -> int:
        """The activation bytes of the step."""
        return self.total + self.largest_block


@contextlib.contextmanager
def fused_attention() -> Iterator[None]:
    """Run ``F.scaled_dot_product_attention`` as a fused kernel for the body, as it runs on a GPU (flash or
    memory-efficient attention) and on a CPU (``_scaled_dot_product_flash_attention_for_cpu``): on the meta
    device torch picks the math path, which would save the whole attention matrix ``(B, heads, N, N)``; the
    fused kernels save the inputs, the output and a float32 log-sum-exp ``(B, heads, N)``."""
    functional = torch.nn.functional
    original = functional.scaled_dot_product_attention

    def fused(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: Any = None,
              dropout_p: float = 0.0, is_causal: bool = False, **kwargs: Any) -> torch.Tensor:  # fmt: skip
        if attn_mask is not None or dropout_p or kwargs.get("enable_gqa") or query.device.type != "meta":
            return original(query, key, value, attn_mask, dropout_p, is_causal, **kwargs)
        return fused_cpu_attention(query, key, value, is_causal, kwargs.get("scale"))

    functional.scaled_dot_product_attention = fused
    try:
        yield
    finally:
        functional.scaled_dot_product_attention = original


@contextlib.contextmanager
def counting_checkpoints(unet: torch.nn.Module, counter: SavedBytes) -> Iterator[None]:
    """Route the UNet's gradient checkpointing through ``counter`` for the body (diffusers calls
    ``module._gradient_checkpointing_func`` on every module with ``gradient_checkpointing`` set)."""
    modules = [m for m in unet.modules() if getattr(m, "gradient_checkpointing", False)]
    before = [checkpointing_function(m) for m in modules]
    for module in modules:
        set_checkpointing_function(module, counter.checkpointed)
    try:
        yield
    finally:
        for module, function in zip(modules, before, strict=True):
            set_checkpointing_function(module, function)


def unet_inputs(unet: Any, batch_size: int, latent_size: int, dtype: torch.dtype, tokens: int = 77) -> dict[str, Any]:
    """Meta inputs of one training batch for ``unet``: ``sample`` ``(B, C, h, w)``, ``timestep`` ``(B,)``,
    ``encoder_hidden_states`` ``(B, tokens, D)`` and for SDXL's ``text_time`` embedding ``added_cond_kwargs``
    (``text_embeds`` ``(B, P)``, ``time_ids`` ``(B, 6)`` float32)."""
    config = unet.config
    meta = {"device": "meta"}
    inputs: dict[str, Any] = {
        "sample": torch.empty(batch_size, config.in_channels, latent_size, latent_size, dtype=dtype, **meta),
        "timestep": torch.empty(batch_size, dtype=torch.long, **meta),
        "encoder_hidden_states": torch.empty(batch_size, tokens, config.cross_attention_dim, dtype=dtype, **meta),
    }
    if config.get("addition_embed_type") == "text_time":
        pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        inputs["added_cond_kwargs"] = {
            "text_embeds": torch.empty(batch_size, pooled, dtype=dtype, **meta),
            "time_ids": torch.empty(batch_size, 6, dtype=torch.float32, **meta),
        }
    return inputs


def saved_activation_bytes(unet: torch.nn.Module, batch_size: int, latent_size: int, dtype: torch.dtype) -> int:
    """The activations one training step of ``unet`` keeps for its backward pass (see the module docstring).

    Args:
        unet: the UNet as it trains (adapters added, blocks frozen, checkpointing set), on the meta device.
        batch_size: samples per rank in one forward pass.
        latent_size: the latents' side (``h = w``).
        dtype: the dtype the UNet computes in (bfloat16 under ``bf16-*``, float32 under ``32-true``).
    """
    counter = SavedBytes({id(p) for p in unet.parameters()})
    inputs = unet_inputs(unet, batch_size, latent_size, dtype)
    with (
        fused_attention(),
        counting_checkpoints(unet, counter),
        torch.autograd.graph.saved_tensors_hooks(counter.pack, lambda tensor: tensor),
        torch.enable_grad(),
    ):
        unet(**inputs)
    return counter.estimate
