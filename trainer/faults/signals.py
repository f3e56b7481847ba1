"""Preemption requests: signal handlers that only record the request, and the exit status of a preempted run.

Schedulers ask a job to stop before they kill it: SLURM sends the signal that ``--signal`` names
(``USR1@120``: SIGUSR1 120 s before the time limit) and SIGTERM on preemption or ``scancel``,
Kubernetes and spot instances send SIGTERM and kill after a grace period, and torchrun forwards
SIGTERM (and the signals in its ``--signals_to_handle``) to its workers. The handlers here only
note which signal came and when: the training loop acts at the next optimizer-step boundary, once
the ranks agree (:mod:`trainer.callbacks.preemption`). Nothing that takes a lock, writes a file or
talks to other ranks runs inside a handler, so a signal can arrive anywhere (in a collective, in a
checkpoint write) without harm. DataLoader workers forked afterwards inherit the handlers, so a
signal sent to the whole process group does not kill them.

With a grace period, a timer thread ends the process when the checkpoint has not been written
within it (the scheduler's SIGKILL would follow anyway): the previous checkpoint is complete (writes
are atomic) and stays the newest, and the log says so instead of the run vanishing mid-write.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import FrameType
from typing import Any

log = logging.getLogger(__name__)

PREEMPTED_EXIT_CODE = 75
"""``EX_TEMPFAIL`` of sysexits.h: a temporary failure, run the same command again to resume."""


class Preempted(Exception):
    """Training stopped at a preemption request after writing a complete checkpoint.

    Attributes:
        signal_name: the signal that asked for the stop (``"SIGTERM"``, ``"SIGUSR1"``).
        step: the optimizer step the checkpoint holds.
        checkpoint: the checkpoint written for it (``""`` when none is configured).
    """

    def __init__(self, signal_name: str, step: int, checkpoint: str) -> None:
        super().__init__(
            f"preempted by {signal_name} at step {step}; checkpoint {checkpoint or '(none configured)'}; "
            "run the same command again to resume"
        )
        self.signal_name = signal_name
        self.step = step
        self.checkpoint = checkpoint


@dataclass(frozen=True)
class Request:
    """One preemption request: the signal and when it came (``time.monotonic()``)."""

    signal_name: str
    received_at: float


def signal_number(name: str) -> signal.Signals:
    """``signal.SIGTERM`` for ``"SIGTERM"`` or ``"TERM"``.

    Raises:
        ValueError: not a signal of this platform.
    """
    key = name.upper() if name.upper().startswith("SIG") else f"SIG{name.upper()}"
    try:
        return signal.Signals[key]
    except KeyError:
        raise ValueError(f"preemption signal {name!r}: not a signal name here (e.g. SIGTERM, SIGUSR1)") from None


class PreemptionSignals:
    """Record the first of ``signals`` that arrives; optionally end the process ``grace_period_s`` later.

    Args:
        signals: names of the signals that ask for a stop.
        grace_period_s: seconds from the signal to a forced exit with :data:`PREEMPTED_EXIT_CODE`
            (``None``: no deadline; the scheduler's kill ends an unfinished save).
        describe: what the process is doing, for the deadline's message (e.g. the current phase).
    """

    def __init__(
        self,
        signals: tuple[str, ...] | list[str] = ("SIGTERM", "SIGUSR1"),
        grace_period_s: float | None = None,
        describe: Callable[[], str] | None = None,
    ) -> None:
        self.signals = [signal_number(name) for name in signals]
        if grace_period_s is not None and grace_period_s <= 0:
            raise ValueError(f"grace_period_s={grace_period_s}: expected a positive number of seconds or null")
        self.grace_period_s = grace_period_s
        self.describe = describe
        self.request: Request | None = None
        self.done = False  # the checkpoint for the request is written
        self._previous: dict[signal.Signals, Any] = {}
        self._timer: threading.Timer | None = None

    def install(self) -> None:
        """Handle the signals here (main thread only; a no-op elsewhere). Keeps the first handlers it replaced."""
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in self.signals:
            previous = signal.signal(signum, self._handle)
            self._previous.setdefault(signum, previous)

    def uninstall(self) -> None:
        """Put back the handlers :meth:`install` replaced first; stop the deadline timer."""
        if self._timer is not None:
            self._timer.cancel()
        if threading.current_thread() is not threading.main_thread():
            return
        for signum, previous in self._previous.items():
            signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()

    def note(self, signal_name: str) -> None:
        """Record a request that arrived some other way (e.g. one Lightning's own handler caught)."""
        if self.request is not None:
            return
        self.request = Request(signal_name, time.monotonic())
        if self.grace_period_s is not None:
            self._timer = threading.Timer(self.grace_period_s, self._deadline)
            self._timer.daemon = True
            self._timer.start()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.note(signal.Signals(signum).name)

    def _deadline(self) -> None:
        doing = f" ({self.describe()})" if self.describe is not None else ""
        if self.done:
            log.error("preemption: checkpoint written, but the process did not end within the grace period; exiting")
        else:
            log.error(
                "preemption: %s came %.0f s ago and the checkpoint was not written within preemption.grace_period_s"
                "%s; exiting now, the previous checkpoint stays the newest (writes are atomic)",
                self.request.signal_name if self.request else "a signal",
                self.grace_period_s,
                doing,
            )
        for handler in logging.getLogger().handlers:
            handler.flush()
        sys.stderr.flush()
        os._exit(PREEMPTED_EXIT_CODE)
