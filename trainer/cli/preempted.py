"""How every ``lf-*`` command ends a preemption: one line and exit status 75 (``EX_TEMPFAIL``).

A run stopped by SIGTERM or SIGUSR1 (a scheduler's preemption, ``scancel``, a spot instance's notice)
raises :class:`~trainer.faults.signals.Preempted` once its checkpoint is written
(:mod:`trainer.callbacks.preemption`), or Lightning's ``SIGTERMException`` when the signal came before
the first step (Lightning's own handler). Either is the expected end of a preempted job, not a fault:
:func:`ending_preemption` turns it into one log line naming the signal, the step and the checkpoint,
and the exit status the launchers read as "run the same command again" (``auto_resume=true``).
``@lf_command`` wraps every command's job in it, so ``lf-demo`` (whose stages train) ends as
``lf-train`` does.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from trainer.faults.signals import PREEMPTED_EXIT_CODE, Preempted

log = logging.getLogger(__name__)
_LIGHTNING_EXCEPTIONS = "lightning.pytorch.utilities.exceptions"
BEFORE_FIRST_STEP = "preempted by SIGTERM before the first step; run the same command again to resume"


@contextmanager
def ending_preemption() -> Iterator[None]:
    """Turn a preemption raised in the block into one warning line and ``SystemExit(75)``.

    Raises:
        SystemExit: with :data:`~trainer.faults.signals.PREEMPTED_EXIT_CODE`, on a preemption.
    """
    try:
        yield
    except Preempted as stop:
        log.warning("%s", stop)
        raise SystemExit(PREEMPTED_EXIT_CODE) from None
    except SystemExit as error:  # Lightning's SIGTERMException is a SystemExit
        if not _is_lightning_sigterm(error):
            raise
        log.warning("%s", BEFORE_FIRST_STEP)  # no step was taken
        raise SystemExit(PREEMPTED_EXIT_CODE) from None


def _is_lightning_sigterm(error: BaseException) -> bool:
    """Whether ``error`` is Lightning's ``SIGTERMException`` (only possible once the job imported Lightning)."""
    exceptions = sys.modules.get(_LIGHTNING_EXCEPTIONS)
    return exceptions is not None and isinstance(error, exceptions.SIGTERMException)
