"""Lightning's private names that :mod:`trainer.cli` uses, and why no public API does the job.

``WandbLogger`` (``trainer.cli.hydra_app``): ``_experiment`` tells whether the run was started;
the public ``experiment`` property starts one when it was not.

The litlogger tip (``quiet_litlogger_tip``, called by ``trainer.cli.quiet``): every ``Trainer``
logs an advertisement for the ``litlogger`` package at info level (three times in one ``lf-demo``).
No flag turns it off; it goes through the logger that ``lightning.pytorch.utilities.rank_zero``
sets for ``rank_zero_info``, whose records with that text a filter drops (other info lines stay).

Importing this module imports no Lightning: the filter goes on by the logger's name, before Lightning is
imported, and the logger is only read.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lf_common.log_filters import drop_log_messages
from lf_common.upstream_contract import PrivateName

if TYPE_CHECKING:
    from lightning.pytorch.loggers import WandbLogger

ADAPTER = "trainer/cli/lightning_private.py"
_RANK_ZERO = "lightning.pytorch.utilities.rank_zero"  # the logger of rank_zero_info
_LOGGER_CONNECTOR = "lightning.pytorch.trainer.connectors.logger_connector.logger_connector"
LITLOGGER_TIP = "try installing [litlogger]"


def wandb_run_started(logger: WandbLogger) -> bool:
    """Whether ``logger`` has started (or attached to) its W&B run in this process."""
    return logger._experiment is not None


def quiet_litlogger_tip() -> None:
    """Drop Lightning's "Tip: ... try installing [litlogger]" line (every ``Trainer`` logs it)."""
    drop_log_messages(_RANK_ZERO, LITLOGGER_TIP)


def _offline_wandb_logger() -> WandbLogger:
    from lightning.pytorch.loggers import WandbLogger

    return WandbLogger(offline=True)


CONTRACTS = (
    PrivateName(
        "lightning",
        "lightning.pytorch.loggers.WandbLogger",
        "_experiment",
        ADAPTER,
        kind="attribute",
        instance=_offline_wandb_logger,
    ),
    PrivateName("lightning", _RANK_ZERO, "rank_zero_module.log = logging.getLogger(__name__)", ADAPTER, kind="source"),
    PrivateName("lightning", _LOGGER_CONNECTOR, LITLOGGER_TIP, ADAPTER, kind="source"),
)
