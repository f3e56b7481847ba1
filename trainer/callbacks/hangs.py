"""Hangs become errors: ranks publish their phase, a watchdog stops a rank without progress, failures reach all.

On a run of several processes this callback sets up this rank's phase board and its watchdog
(:mod:`trainer.faults.ranks`, :mod:`trainer.faults.watchdog`) and keeps the phase current:

* ``first step``: from the start of training to the first optimizer step: compilation, the FLOP
  count, a resumed loader skipping what it had consumed; an *alive* phase (no timeout: its length
  cannot be bounded in advance);
* ``training``: progress at every batch; the watchdog is armed from here on;
* ``validation``: progress at every validation batch;
* the phases other code opens: ``validation images`` and ``checkpoint save`` (single-rank work
  whose ranks meet through the store), ``FLOP count``.

When this rank raises (a storage error, a corrupt-data limit, ...), the others learn it through
the board and stop at once with its message, instead of waiting in their next collective for the
process-group timeout. A preemption is not a failure: every rank stops at the same step by itself.
"""

from __future__ import annotations

import logging
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback

from trainer.faults.ranks import PeerFailedError, current_board, set_board
from trainer.faults.signals import Preempted
from trainer.faults.watchdog import Watchdog, start_board

log = logging.getLogger(__name__)


class HangGuard(Callback):
    """Publish this rank's phase, run the hang watchdog, tell the other ranks when this one fails.

    Args:
        timeout_s: a rank without progress for this long is hung (``distributed.timeout_s``); the
            process group's own timeout is set a minute longer (``conf/strategy``).
    """

    def __init__(self, timeout_s: float = 1800.0) -> None:
        if timeout_s <= 0:
            raise ValueError(f"distributed.timeout_s={timeout_s}: expected a positive number of seconds")
        self.timeout_s = timeout_s
        self.watchdog: Watchdog | None = None
        self._phase_before_validation: tuple[str, int, bool, bool] | None = None
        self._last_step = -1

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":  # one process or no process group: no board, every hook here is a no-op
            self.watchdog = start_board(trainer.global_rank, trainer.world_size, self.timeout_s)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if (board := current_board()) is not None:
            board.enter("first step", trainer.global_step, alive=True)
        self._last_step = trainer.global_step

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if (board := current_board()) is None:
            return
        if trainer.global_step != self._last_step and board.phase == "first step":
            board.enter("training", trainer.global_step)
            if self.watchdog is not None:
                self.watchdog.armed = True
        self._last_step = trainer.global_step
        board.progress(trainer.global_step)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if (board := current_board()) is not None:
            self._phase_before_validation = board.enter("validation", trainer.global_step)

    def on_validation_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *_: Any) -> None:
        if (board := current_board()) is not None:
            board.progress()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if (board := current_board()) is not None and self._phase_before_validation is not None:
            board.restore(self._phase_before_validation)
            self._phase_before_validation = None

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        board = current_board()
        if board is not None and not isinstance(exception, (Preempted, PeerFailedError, KeyboardInterrupt)):
            board.report_failure(f"{type(exception).__name__}: {exception}")
        self.teardown(trainer, pl_module, "fit")  # Lightning calls no teardown hook after an exception

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.watchdog is not None:
            self.watchdog.stop()
            self.watchdog = None
        set_board(None)
