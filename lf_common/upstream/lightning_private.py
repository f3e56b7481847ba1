"""Lightning's private names that latentforge uses, and why no public API does the job.

Every use of a private Lightning name goes through this module: the overrides are the ``*Hooks``
base classes below, which route Lightning's private step to a method of ours with a name of ours,
and the reads are the functions. ``CONTRACTS`` lists them all for
``tests/unit/test_upstream_contracts.py``; when Lightning renames one, that test says which.

``ModelCheckpoint`` (``trainer.callbacks.checkpoint``): every save of the callback goes through
``_save_checkpoint`` and every deletion through ``_remove_checkpoint`` (overridden since PR #16067
so that subclasses can change them; no public hook exists). Writing under a temporary name and
renaming is done there. ``_last_global_step_saved`` and ``_last_checkpoint_saved`` record what was
saved (Lightning does not restore them on resume, nor offers a setter), and the final-step save
repeats what Lightning's own triggers do (``_should_skip_saving_checkpoint``,
``_monitor_candidates``, ``_save_topk_checkpoint``, ``_save_last_checkpoint``), which are private.
``_fs`` is the callback's filesystem (fsspec) for its ``dirpath``.

``WeightAveraging`` (``trainer.callbacks.ema``): the ``AveragedModel`` it keeps,
``_average_model``, has no accessor.

``ThroughputMonitor`` (``trainer.callbacks.throughput``): the per-stage ``Throughput`` objects
(``_throughputs``) take the peak FLOP/s when ``setup`` builds them from Lightning's own table;
overriding the peak (CPUs, new GPUs) means setting it on each.

``DeepSpeedStrategy`` (``trainer.strategies.deepspeed``): it refuses every accelerator but CUDA;
on CPU, ``_init_deepspeed_distributed`` (environment variables and ``deepspeed.init_distributed``
with the strategy's backend and timeout) is still the way to start the process group, and
``_setup_model_and_optimizer`` (the ``deepspeed.initialize`` call, given the CUDA device index) is
the one place to call it differently.

``FSDPStrategy`` (``trainer.strategies.fsdp``): ``_setup_model`` wraps the model with
``device_id=root_device.index`` (``None`` on CPU, and ``device_id`` cannot go through its kwargs).

``Trainer.save_checkpoint`` (``trainer.callbacks.checkpoint``): it collects the checkpoint with
``_checkpoint_connector.dump_checkpoint``, has the strategy write it, then waits in a process-group
barrier while rank 0 writes. A large checkpoint on slow storage outlasts the process-group timeout
there; ``write_checkpoint`` does the first two steps, and the ranks meet through the store instead
(``trainer.faults.ranks``). No public call collects a checkpoint without writing it. It writes to a
staging folder on each machine's own disk, whose path may differ between machines (each its own
``output_dir``); ``DeepSpeedStrategy.save_checkpoint`` (and ``FSDPStrategy``'s sharded save) first
broadcasts rank 0's path, which would put the other machines' parts under a path of rank 0's, where
their uploader never looks: for that call, a path broadcast returns each rank's own (no option skips it).

``WandbLogger`` (``trainer.cli.hydra_app``): ``_experiment`` tells whether the run was started;
the public ``experiment`` property starts one when it was not.

The litlogger tip (``quiet_litlogger_tip``, called by ``trainer.cli.quiet``): every ``Trainer``
logs an advertisement for the ``litlogger`` package at info level (three times in one ``lf-demo``).
No flag turns it off; it goes through the logger that ``lightning.pytorch.utilities.rank_zero``
sets for ``rank_zero_info``, whose records with that text a filter drops (other info lines stay).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import lightning as L
from lightning.fabric.utilities.throughput import Throughput
from lightning.pytorch.callbacks import ModelCheckpoint, ThroughputMonitor, WeightAveraging
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy
from torch.nn import Module
from torch.optim import Optimizer
from torch.optim.swa_utils import AveragedModel

from lf_common.log_filters import drop_log_messages
from lf_common.upstream.contract import PrivateName

ADAPTER = "lf_common/upstream/lightning_private.py"


class ModelCheckpointHooks(ModelCheckpoint):
    """Lightning's ``ModelCheckpoint`` with its private save and delete steps under names of ours."""

    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        self.save_checkpoint_file(trainer, filepath)

    def _remove_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        self.remove_checkpoint_file(trainer, filepath)

    def save_checkpoint_file(self, trainer: L.Trainer, filepath: str) -> None:
        """Write one checkpoint (every save of the callback comes here); Lightning's step by default."""
        super()._save_checkpoint(trainer, filepath)

    def remove_checkpoint_file(self, trainer: L.Trainer, filepath: str) -> None:
        """Delete one checkpoint the callback no longer keeps; Lightning's step by default."""
        super()._remove_checkpoint(trainer, filepath)

    @property
    def filesystem(self) -> Any:
        """The fsspec filesystem of ``dirpath``."""
        return self._fs

    def record_saved(self, step: int, filepath: str | None = None) -> None:
        """Count ``step`` as saved (no second save at that step), at ``filepath`` when given."""
        self._last_global_step_saved = step
        if filepath is not None:
            self._last_checkpoint_saved = filepath

    def save_top_k_and_last(self, trainer: L.Trainer) -> None:
        """Save now as the triggers do (top-k and ``last``), unless this step is saved or fit is not running."""
        if not self._should_skip_saving_checkpoint(trainer):
            candidates = self._monitor_candidates(trainer)
            self._save_topk_checkpoint(trainer, candidates)
            self._save_last_checkpoint(trainer, candidates)


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


def write_checkpoint(trainer: L.Trainer, filepath: str, weights_only: bool = False) -> None:
    """``trainer.save_checkpoint(filepath, weights_only)`` without its closing barrier (call on every rank),
    each rank writing its part to its own ``filepath`` (its machine's staging folder): the strategies that
    write a folder of per-rank files (DeepSpeed, FSDP's sharded save) would first take rank 0's path."""
    checkpoint = trainer._checkpoint_connector.dump_checkpoint(weights_only)
    with own_path_broadcast(trainer.strategy, filepath):
        trainer.strategy.save_checkpoint(checkpoint, filepath)


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


def averaged_model(callback: WeightAveraging) -> AveragedModel | None:
    """The ``AveragedModel`` of ``callback`` (``None`` before fit sets it up)."""
    return callback._average_model


def stage_throughputs(monitor: ThroughputMonitor) -> Iterable[Throughput]:
    """The ``Throughput`` trackers ``monitor.setup`` built, one per running stage."""
    return monitor._throughputs.values()


def wandb_run_started(logger: WandbLogger) -> bool:
    """Whether ``logger`` has started (or attached to) its W&B run in this process."""
    return logger._experiment is not None


_CHECKPOINT = "lightning.pytorch.callbacks.ModelCheckpoint"
_METHODS = (  # owner, name, parameters after self
    (_CHECKPOINT, "_save_checkpoint", "trainer filepath"),
    (_CHECKPOINT, "_remove_checkpoint", "trainer filepath"),
    (_CHECKPOINT, "_should_skip_saving_checkpoint", "trainer"),
    (_CHECKPOINT, "_monitor_candidates", "trainer"),
    (_CHECKPOINT, "_save_topk_checkpoint", "trainer monitor_candidates"),
    (_CHECKPOINT, "_save_last_checkpoint", "trainer monitor_candidates"),
    ("lightning.pytorch.strategies.DeepSpeedStrategy", "_init_deepspeed_distributed", ""),
    ("lightning.pytorch.strategies.DeepSpeedStrategy", "_setup_model_and_optimizer", "model optimizer lr_scheduler"),
    ("lightning.pytorch.strategies.FSDPStrategy", "_setup_model", "model"),
    (
        "lightning.pytorch.trainer.connectors.checkpoint_connector._CheckpointConnector",
        "dump_checkpoint",
        "weights_only",
    ),
)
_ATTRIBUTES = (  # owner, name, a cheap instance (the attributes are set in __init__)
    (_CHECKPOINT, "_fs", ModelCheckpoint),
    (_CHECKPOINT, "_last_global_step_saved", ModelCheckpoint),
    (_CHECKPOINT, "_last_checkpoint_saved", ModelCheckpoint),
    ("lightning.pytorch.callbacks.WeightAveraging", "_average_model", WeightAveraging),
    ("lightning.pytorch.callbacks.ThroughputMonitor", "_throughputs", lambda: ThroughputMonitor(len)),
    ("lightning.pytorch.loggers.WandbLogger", "_experiment", lambda: WandbLogger(offline=True)),
    ("lightning.pytorch.Trainer", "_checkpoint_connector", lambda: L.Trainer(logger=False, enable_checkpointing=False)),
)
_RANK_ZERO = "lightning.pytorch.utilities.rank_zero"  # the logger of rank_zero_info
_LOGGER_CONNECTOR = "lightning.pytorch.trainer.connectors.logger_connector.logger_connector"
LITLOGGER_TIP = "try installing [litlogger]"
_SOURCES = (  # owner, text its source holds
    (_RANK_ZERO, "rank_zero_module.log = logging.getLogger(__name__)"),
    (_LOGGER_CONNECTOR, LITLOGGER_TIP),
)
CONTRACTS = (
    *(
        PrivateName("lightning", owner, name, ADAPTER, parameters=("self", *parameters.split()))
        for owner, name, parameters in _METHODS
    ),
    *(
        PrivateName("lightning", owner, name, ADAPTER, kind="attribute", instance=instance)
        for owner, name, instance in _ATTRIBUTES
    ),
    *(PrivateName("lightning", owner, text, ADAPTER, kind="source") for owner, text in _SOURCES),
    # write_checkpoint repeats Trainer.save_checkpoint's steps but its barrier: still these two
    PrivateName(
        "lightning",
        "lightning.pytorch.Trainer.save_checkpoint",
        "checkpoint = self._checkpoint_connector.dump_checkpoint(weights_only)",
        ADAPTER,
        kind="source",
    ),
    PrivateName(
        "lightning",
        "lightning.pytorch.Trainer.save_checkpoint",
        "self.strategy.save_checkpoint(checkpoint, filepath, storage_options=storage_options)",
        ADAPTER,
        kind="source",
    ),
)


def quiet_litlogger_tip() -> None:
    """Drop Lightning's "Tip: ... try installing [litlogger]" line (every ``Trainer`` logs it)."""
    drop_log_messages(_RANK_ZERO, LITLOGGER_TIP)
