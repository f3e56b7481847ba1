"""Preemption: on SIGTERM or SIGUSR1, finish the optimizer step, agree across ranks, checkpoint, exit "resume me".

What Lightning offers, and why this callback does the rest:

* Lightning's SIGTERM handler (``trainer.connectors.signal_connector``) sets
  ``trainer.received_sigterm``, and the loop raises ``SIGTERMException`` after the current batch,
  with exit status 0 and no checkpoint. Under gradient accumulation that batch may be a micro-batch
  in the middle of an optimizer step, whose accumulated gradient no checkpoint can hold; the
  handler also broadcasts to the other ranks from inside itself, which only pairs up when every
  rank got the signal (Lightning issue #20806). This callback installs its own handlers once
  Lightning has set up its own (``on_train_start``), adopts a SIGTERM that Lightning caught before
  that, and restores Lightning's in ``teardown``.
* Lightning's SLURM auto-requeue (``SLURMEnvironment(auto_requeue=True)``) saves an ``hpc_ckpt``
  from inside the SIGUSR1 handler, wherever the loop happens to be, and calls ``scontrol requeue``.
  Installing the handlers in ``setup`` (before Lightning registers its own) keeps Lightning from
  registering that one; ``launch/slurm.sbatch`` requeues on the exit status instead.
* ``OnExceptionCheckpoint`` saves in ``on_exception``, on the rank that raised, at whatever point
  it raised: not a step boundary, and not all ranks. ``Trainer.should_stop`` ends the loop
  gracefully, but runs validation first and marks the epoch as finished, so a resumed run would
  start a new epoch (a different data order without ``data.resampled``).

So: a handler only records the request (:mod:`trainer.faults.signals`). After each optimizer step
(``on_train_batch_end`` once ``global_step`` moved), the ranks take the largest signal number seen
(one all-reduce of one number: they agree on the same step whichever ranks got the signal), and
then write the checkpoint the ``AtomicModelCheckpoint`` callback would write at that step (top-k and
``last``, atomic) and raise :class:`~trainer.faults.signals.Preempted`. This callback is a
``Checkpoint``, so Lightning runs it after every other callback's ``on_train_batch_end`` (EMA
update, logging): the checkpoint is the one a periodic save at that step would be, and the resume
from it is as exact. Every ``lf-*`` command turns ``Preempted`` into exit status 75 (``EX_TEMPFAIL``;
:mod:`trainer.cli.preempted`).
"""

from __future__ import annotations

import logging
import signal
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Checkpoint
from torch.distributed import ReduceOp

from lf_common.errors import ConfigError
from trainer.callbacks.checkpoint import AtomicModelCheckpoint
from trainer.faults.ranks import current_board
from trainer.faults.signals import Preempted, PreemptionSignals, signal_number

log = logging.getLogger(__name__)


class Preemption(Checkpoint):
    """Stop at a preemption signal with a complete checkpoint at the current optimizer step.

    Args:
        signals: names of the signals that ask for a stop.
        grace_period_s: seconds from the signal to a forced exit (the checkpoint unfinished, the
            previous one kept); set it below the scheduler's warning time (SLURM's ``--signal=USR1@N``,
            Kubernetes' ``terminationGracePeriodSeconds``). ``null``: no deadline.
        check_every_n_steps: the ranks compare requests after every n-th optimizer step (one
            all-reduce of one number each time).
    """

    def __init__(
        self,
        signals: list[str] | tuple[str, ...] = ("SIGTERM", "SIGUSR1"),
        grace_period_s: float | None = 90.0,
        check_every_n_steps: int = 1,
    ) -> None:
        if check_every_n_steps < 1:
            raise ValueError(f"check_every_n_steps={check_every_n_steps}: expected a positive number")
        self.signals = PreemptionSignals(signals, grace_period_s, describe=self._doing)
        self.check_every_n_steps = check_every_n_steps
        self._last_step = -1

    @property
    def grace_period_s(self) -> float | None:
        """Seconds from a signal to the forced exit (``None``: no deadline)."""
        return self.signals.grace_period_s

    def _doing(self) -> str:
        board = current_board()
        return f"this rank is in '{board.phase}' at step {board.step}" if board is not None else "this rank is busy"

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if _model_checkpoint(trainer) is None:
            raise ConfigError(
                "callbacks.preemption needs callbacks.model_checkpoint "
                "(trainer.callbacks.checkpoint.AtomicModelCheckpoint) to write its checkpoint; add it back, "
                "or set callbacks.preemption=null"
            )
        self.signals.install()

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.signals.install()  # over the handlers Lightning registered since setup (see the module's docstring)
        if trainer.received_sigterm:
            self.signals.note("SIGTERM")  # it came while Lightning's handler was in place
        self._last_step = trainer.global_step
        if trainer.ckpt_path and trainer.is_global_zero:
            log.info("resumed from %s at step %d", trainer.ckpt_path, trainer.global_step)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step == self._last_step:
            return  # a micro-batch within an optimizer step: the step is not finished
        self._last_step = trainer.global_step
        if trainer.global_step % self.check_every_n_steps:
            return
        signum = self._agreed_signal(trainer)
        if signum:
            self.stop(trainer, signum)

    def _agreed_signal(self, trainer: L.Trainer) -> int:
        """The largest signal number any rank received (0: none); the same on every rank."""
        request = self.signals.request
        mine = int(signal_number(request.signal_name)) if request is not None else 0
        if trainer.world_size == 1:
            return mine
        seen = torch.tensor(mine, device=trainer.strategy.root_device)
        return int(trainer.strategy.reduce(seen, reduce_op=ReduceOp.MAX))

    def stop(self, trainer: L.Trainer, signum: int) -> None:
        """Write the checkpoint of this step (unless a periodic save just did) and raise :class:`Preempted`."""
        name = signal.Signals(signum).name
        if trainer.is_global_zero:
            log.warning("preemption: %s received; saving step %d and stopping", name, trainer.global_step)
        checkpoint = _model_checkpoint(trainer)
        checkpoint.save_top_k_and_last(trainer)
        self.signals.done = True
        path = checkpoint.last_model_path or checkpoint.best_model_path
        raise Preempted(name, trainer.global_step, path)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.signals.uninstall()


def _model_checkpoint(trainer: L.Trainer) -> AtomicModelCheckpoint | None:
    """The trainer's (first) :class:`~trainer.callbacks.checkpoint.AtomicModelCheckpoint` callback."""
    return next((c for c in trainer.callbacks if isinstance(c, AtomicModelCheckpoint)), None)
