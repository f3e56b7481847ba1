"""PyTorch's private names that :mod:`trainer.callbacks.ema` uses, and why no public API does the job.

``torch._foreach_lerp_``: one fused in-place ``lerp`` over all of a model's tensors, the EMA update. It
is what ``torch.optim`` and ``torch.optim.swa_utils``'s own EMA use; the public per-tensor
``Tensor.lerp_`` is the same math in one kernel launch per tensor (slow on GPUs), and
``swa_utils.get_ema_multi_avg_fn`` has a fixed decay and no cast of bf16 weights into a float32 average.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lf_common.upstream_contract import PrivateName

ADAPTER = "trainer/callbacks/torch_private.py"


def foreach_lerp_(tensors: Sequence[torch.Tensor], ends: Sequence[torch.Tensor], weight: float) -> None:
    """``t += weight * (end - t)`` for every pair, in place and fused (``torch._foreach_lerp_``)."""
    torch._foreach_lerp_(tensors, ends, weight)


CONTRACTS = (PrivateName("torch", "torch", "_foreach_lerp_", ADAPTER),)  # a builtin: no readable signature
