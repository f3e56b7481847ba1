"""Lightning's private names that :mod:`trainer.strategies` uses, and why no public API does the job.

The overrides are the ``*Hooks`` base classes below, which route Lightning's private step to a method of
ours with a name of ours. ``CONTRACTS`` lists them all for ``tests/unit/test_upstream_contracts.py``; when
Lightning renames one, that test says which.

``DeepSpeedStrategy`` (``trainer.strategies.deepspeed``): it refuses every accelerator but CUDA;
on CPU, ``_init_deepspeed_distributed`` (environment variables and ``deepspeed.init_distributed``
with the strategy's backend and timeout) is still the way to start the process group, and
``_setup_model_and_optimizer`` (the ``deepspeed.initialize`` call, given the CUDA device index) is
the one place to call it differently.

``FSDPStrategy`` (``trainer.strategies.fsdp``): ``_setup_model`` wraps the model with
``device_id=root_device.index`` (``None`` on CPU, and ``device_id`` cannot go through its kwargs).

A checkpoint path on each machine's own disk (a staging folder, a downloaded copy under ``output_dir``)
may differ between machines; ``DeepSpeedStrategy.save_checkpoint`` (and ``FSDPStrategy``'s sharded save)
first broadcasts rank 0's path, and ``FSDPStrategy.load_checkpoint`` does too (no option skips it):
:func:`own_path_broadcast` makes that broadcast return each rank's own path (``trainer.strategies.fsdp``'s
load, and the checkpoint callback's write, :func:`trainer.callbacks.lightning_private.write_checkpoint`).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy
from torch.nn import Module
from torch.optim import Optimizer

from lf_common.upstream_contract import PrivateName

ADAPTER = "trainer/strategies/lightning_private.py"


class DeepSpeedStrategyHooks(DeepSpeedStrategy):
    """Lightning's ``DeepSpeedStrategy`` with its private distributed and engine set-up under names of ours."""

    def _setup_model_and_optimizer(
        self, model: Module, optimizer: Optimizer | None, lr_scheduler: Any = None
    ) -> tuple[Any, Optimizer]:
        return self.initialize_engine(model, optimizer, lr_scheduler)

    def initialize_engine(self, model: Module, optimizer: Optimizer | None, lr_scheduler: Any = None) -> tuple:
        """The ``deepspeed.initialize`` step: returns the engine and its optimizer; Lightning's (CUDA) by default."""
        return super()._setup_model_and_optimizer(model, optimizer, lr_scheduler)

    def init_deepspeed_distributed(self) -> None:
        """Lightning's start of the process group (rank variables, ``deepspeed.init_distributed``)."""
        self._init_deepspeed_distributed()


class FSDPStrategyHooks(FSDPStrategy):
    """Lightning's ``FSDPStrategy`` with its private model wrapping under a name of ours."""

    def _setup_model(self, model: Module) -> Module:
        return self.wrap_model(model)

    def wrap_model(self, model: Module) -> Module:
        """Wrap ``model`` in FSDP (Lightning leaves an already wrapped model as it is); Lightning's step by default."""
        return super()._setup_model(model)


@contextmanager
def own_path_broadcast(strategy: Any, path: str | os.PathLike[str]) -> Iterator[None]:
    """For the block, ``strategy.broadcast(path)`` returns each rank's own ``path`` instead of rank 0's.

    Lightning's DeepSpeed and FSDP strategies broadcast rank 0's checkpoint path before a save or a load;
    a path on each machine's own disk (a staging folder, a downloaded copy under ``output_dir``) may differ
    between machines. Every rank calls with its own path, so every rank skips that same collective and the
    ranks stay in step; any other broadcast goes through. The instance's method is restored after.
    """
    broadcast, patched = strategy.broadcast, "broadcast" in vars(strategy)
    own = os.fspath(path)

    def own_path(obj: Any, src: int = 0) -> Any:
        same = isinstance(obj, (str, os.PathLike)) and os.fspath(obj) == own  # the same on every rank
        return obj if same else broadcast(obj, src)

    strategy.broadcast = own_path
    try:
        yield
    finally:
        if patched:
            strategy.broadcast = broadcast
        else:
            del strategy.broadcast  # the class's method again


_DEEPSPEED = "lightning.pytorch.strategies.DeepSpeedStrategy"
_FSDP = "lightning.pytorch.strategies.FSDPStrategy"
CONTRACTS = (
    PrivateName("lightning", _DEEPSPEED, "_init_deepspeed_distributed", ADAPTER, parameters=("self",)),
    PrivateName(
        "lightning",
        _DEEPSPEED,
        "_setup_model_and_optimizer",
        ADAPTER,
        parameters=("self", "model", "optimizer", "lr_scheduler"),
    ),
    PrivateName("lightning", _FSDP, "_setup_model", ADAPTER, parameters=("self", "model")),
    # what own_path_broadcast undoes: the strategies broadcast rank 0's checkpoint path
    PrivateName("lightning", f"{_DEEPSPEED}.save_checkpoint", "self.broadcast(filepath)", ADAPTER, kind="source"),
    PrivateName("lightning", f"{_FSDP}.load_checkpoint", "self.broadcast(checkpoint_path)", ADAPTER, kind="source"),
)
