"""PyTorch's private names that :mod:`trainer.faults` uses, and why no public API does the job.

``torch.distributed.distributed_c10d._get_default_store``: the key-value store the default process group
was built on (the TCPStore of the rendezvous, or torchrun's agent store). The phase board and the meetings
of single-rank work (:mod:`trainer.faults.ranks`; the watchdog hands it the store) live there;
creating a store of our own would need a second address and port that every launcher passes to every rank.
"""

from __future__ import annotations

import torch

from lf_common.upstream_contract import PrivateName

ADAPTER = "trainer/faults/torch_private.py"


def default_store() -> torch.distributed.Store:
    """The key-value store of the default process group (initialized)."""
    return torch.distributed.distributed_c10d._get_default_store()


CONTRACTS = (PrivateName("torch", "torch.distributed.distributed_c10d", "_get_default_store", ADAPTER, parameters=()),)
