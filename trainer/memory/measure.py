"""The peak of tensor memory a piece of work allocates on the CPU, counted storage by storage.

:class:`LiveBytes` is a ``TorchDispatchMode``: every storage an operation creates is added when it appears and
taken off when it is freed (a finalizer on the storage, whose Python object torch keeps for the storage's
life), so the running sum is what the work holds and its maximum the peak; storages that existed before (the
weights) and outputs that alias an input (in-place operations, views) are not counted. What
``torch.cuda.max_memory_allocated`` measures on a GPU, without the allocator's rounding, and unlike RSS blind to
the C library's pools. The plan's activation estimate is checked against it (``tests/unit/test_memory_plan.py``,
``bench/memory_plan.py``).
"""

from __future__ import annotations

import weakref
from typing import Any

import torch

from trainer.memory.torch_private import TorchDispatchMode, tree_flatten


class LiveBytes(TorchDispatchMode):
    """Counts the bytes of CPU storages created in its body and still alive.

    Attributes:
        held: bytes alive now; peak: the most alive at once.
    """

    def __init__(self) -> None:
        super().__init__()
        self.held = 0
        self.peak = 0
        self._alive: set[int] = set()

    def _free(self, key: int, size: int) -> None:
        self._alive.discard(key)
        self.held -= size

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        inputs = {
            t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)
        }
        for tensor in tree_flatten(out)[0]:
            if not isinstance(tensor, torch.Tensor) or tensor.device.type != "cpu":
                continue
            storage = tensor.untyped_storage()
            key = storage.data_ptr()
            if not key or key in inputs or key in self._alive:
                continue
            size = storage.nbytes()
            self._alive.add(key)
            self.held += size
            self.peak = max(self.peak, self.held)
            weakref.finalize(storage, self._free, key, size)
        return out
