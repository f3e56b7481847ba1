"""PyTorch's private names that latentforge uses, and why no public API does the job.

``torch._foreach_lerp_`` (``trainer.callbacks.ema``): one fused in-place ``lerp`` over all of a
model's tensors, the EMA update. It is what ``torch.optim`` and ``torch.optim.swa_utils``'s own
EMA use; the public per-tensor ``Tensor.lerp_`` is the same math in one kernel launch per tensor
(slow on GPUs), and ``swa_utils.get_ema_multi_avg_fn`` has a fixed decay and no cast of bf16
weights into a float32 average.

``DataLoader._iterator`` and ``_MultiProcessingDataLoaderIter._shutdown_workers``
(``data_pipelines.shards.resumable_loader``): with ``persistent_workers`` the loader keeps one iterator,
and its worker processes with their copies of the dataset, for its whole life; an exact resume
restarts the stream from its beginning, which needs fresh workers. No public call ends them.

``torch.distributed.distributed_c10d._get_default_store`` (``trainer.faults.ranks``): the key-value
store the default process group was built on (the TCPStore of the rendezvous, or torchrun's agent
store). The phase board and the meetings of single-rank work live there; creating a store of our
own would need a second address and port that every launcher passes to every rank.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.utils.data import DataLoader

from lf_common.upstream.contract import PrivateName

ADAPTER = "lf_common/upstream/torch_private.py"


def foreach_lerp_(tensors: Sequence[torch.Tensor], ends: Sequence[torch.Tensor], weight: float) -> None:
    """``t += weight * (end - t)`` for every pair, in place and fused (``torch._foreach_lerp_``)."""
    torch._foreach_lerp_(tensors, ends, weight)


def restart_workers(loader: DataLoader) -> None:
    """End the worker processes that a ``persistent_workers`` loader keeps, so its next iterator starts
    new ones with fresh copies of the dataset (no-op without persistent workers)."""
    iterator = loader._iterator
    if iterator is not None and hasattr(iterator, "_shutdown_workers"):  # single-process iterators have none
        iterator._shutdown_workers()
    loader._iterator = None


def default_store() -> torch.distributed.Store:
    """The key-value store of the default process group (initialized)."""
    return torch.distributed.distributed_c10d._get_default_store()


_LOADER = "torch.utils.data.DataLoader"
_WORKERS_ITERATOR = "torch.utils.data.dataloader._MultiProcessingDataLoaderIter"
CONTRACTS = (
    PrivateName("torch", "torch", "_foreach_lerp_", ADAPTER),  # a builtin: no readable signature
    PrivateName("torch", _LOADER, "_iterator", ADAPTER, kind="attribute", instance=lambda: DataLoader([])),
    PrivateName("torch", f"{_LOADER}.__iter__", "if self._iterator is None:", ADAPTER, kind="source"),  # kept, reused
    PrivateName("torch", _WORKERS_ITERATOR, "_shutdown_workers", ADAPTER, parameters=("self",)),
    PrivateName("torch", "torch.distributed.distributed_c10d", "_get_default_store", ADAPTER, parameters=()),
)
