"""Lightning's private names that :mod:`trainer.callbacks` uses, and why no public API does the job.

The overrides are the ``*Hooks`` base class below, which routes Lightning's private steps to methods of
ours with names of ours, and the reads are the functions. ``CONTRACTS`` lists them all for
``tests/unit/test_upstream_contracts.py``; when Lightning renames one, that test says which.

``ModelCheckpoint`` (``trainer.callbacks.checkpoint``): every save of the callback goes through
``_save_checkpoint`` and every deletion through ``_remove_checkpoint`` (overridden since PR #16067
so that subclasses can change them; no public hook exists). Writing under a temporary name and
renaming is done there. ``_last_global_step_saved`` and ``_last_checkpoint_saved`` record what was
saved (Lightning does not restore them on resume, nor offers a setter), and the final-step save
repeats what Lightning's own triggers do (``_should_skip_saving_checkpoint``,
``_monitor_candidates``, ``_save_topk_checkpoint``, ``_save_last_checkpoint``), which are private.
``_fs`` is the callback's filesystem (fsspec) for its ``dirpath``.

``ThroughputMonitor`` (``trainer.callbacks.throughput``): the per-stage ``Throughput`` objects
(``_throughputs``) take the peak FLOP/s when ``setup`` builds them from Lightning's own table;
overriding the peak (CPUs, new GPUs) means setting it on each.

``Trainer.save_checkpoint`` (``trainer.callbacks.checkpoint`` and ``checkpoint_upload``): it collects the
checkpoint with ``_checkpoint_connector.dump_checkpoint``, has the strategy write it, then waits in a
process-group barrier while rank 0 writes. A large checkpoint on slow storage outlasts the process-group
timeout there; ``write_checkpoint`` does the first two steps, and the ranks meet through the store instead
(``trainer.faults.ranks``). No public call collects a checkpoint without writing it. It writes to a
staging folder on each machine's own disk, whose path may differ between machines (each its own
``output_dir``); the strategies' path broadcast is undone for that call
(:func:`trainer.strategies.lightning_private.own_path_broadcast`).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import lightning as L
from lightning.fabric.utilities.throughput import Throughput
from lightning.pytorch.callbacks import ModelCheckpoint, ThroughputMonitor

from lf_common.upstream_contract import PrivateName
from trainer.strategies.lightning_private import own_path_broadcast

ADAPTER = "trainer/callbacks/lightning_private.py"


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


def write_checkpoint(trainer: L.Trainer, filepath: str, weights_only: bool = False) -> None:
    """``trainer.save_checkpoint(filepath, weights_only)`` without its closing barrier (call on every rank),
    each rank writing its part to its own ``filepath`` (its machine's staging folder): the strategies that
    write a folder of per-rank files (DeepSpeed, FSDP's sharded save) would first take rank 0's path."""
    checkpoint = trainer._checkpoint_connector.dump_checkpoint(weights_only)
    with own_path_broadcast(trainer.strategy, filepath):
        trainer.strategy.save_checkpoint(checkpoint, filepath)


def stage_throughputs(monitor: ThroughputMonitor) -> Iterable[Throughput]:
    """The ``Throughput`` trackers ``monitor.setup`` built, one per running stage."""
    return monitor._throughputs.values()


_CHECKPOINT = "lightning.pytorch.callbacks.ModelCheckpoint"
_METHODS = (  # owner, name, parameters after self
    (_CHECKPOINT, "_save_checkpoint", "trainer filepath"),
    (_CHECKPOINT, "_remove_checkpoint", "trainer filepath"),
    (_CHECKPOINT, "_should_skip_saving_checkpoint", "trainer"),
    (_CHECKPOINT, "_monitor_candidates", "trainer"),
    (_CHECKPOINT, "_save_topk_checkpoint", "trainer monitor_candidates"),
    (_CHECKPOINT, "_save_last_checkpoint", "trainer monitor_candidates"),
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
    ("lightning.pytorch.callbacks.ThroughputMonitor", "_throughputs", lambda: ThroughputMonitor(len)),
    ("lightning.pytorch.Trainer", "_checkpoint_connector", lambda: L.Trainer(logger=False, enable_checkpointing=False)),
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
