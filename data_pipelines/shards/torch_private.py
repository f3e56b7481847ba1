"""PyTorch's private names that :mod:`data_pipelines.shards.resumable_loader` uses, and why no public API does the job.

``DataLoader._iterator`` and ``_MultiProcessingDataLoaderIter._shutdown_workers``: with
``persistent_workers`` the loader keeps one iterator, and its worker processes with their copies of the
dataset, for its whole life; an exact resume restarts the stream from its beginning, which needs fresh
workers. No public call ends them.
"""

from __future__ import annotations

from torch.utils.data import DataLoader

from lf_common.upstream_contract import PrivateName

ADAPTER = "data_pipelines/shards/torch_private.py"


def restart_workers(loader: DataLoader) -> None:
    """End the worker processes that a ``persistent_workers`` loader keeps, so its next iterator starts
    new ones with fresh copies of the dataset (no-op without persistent workers)."""
    iterator = loader._iterator
    if iterator is not None and hasattr(iterator, "_shutdown_workers"):  # single-process iterators have none
        iterator._shutdown_workers()
    loader._iterator = None


_LOADER = "torch.utils.data.DataLoader"
_WORKERS_ITERATOR = "torch.utils.data.dataloader._MultiProcessingDataLoaderIter"
CONTRACTS = (
    PrivateName("torch", _LOADER, "_iterator", ADAPTER, kind="attribute", instance=lambda: DataLoader([])),
    PrivateName("torch", f"{_LOADER}.__iter__", "if self._iterator is None:", ADAPTER, kind="source"),  # kept, reused
    PrivateName("torch", _WORKERS_ITERATOR, "_shutdown_workers", ADAPTER, parameters=("self",)),
)
