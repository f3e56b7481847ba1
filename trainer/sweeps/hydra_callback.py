"""A Hydra callback that writes the sweep summary when a multirun ends (any sweeper)."""

from __future__ import annotations

import logging
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from lf_common.errors import DataError

log = logging.getLogger(__name__)


class WriteSweepSummary(Callback):
    """``hydra.callbacks.sweep_summary``: ``summary.md/.csv/.png`` in the sweep folder at the end."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from trainer.sweeps.summary import write_summary  # here: Hydra builds this callback for every run

        sweep_dir = config.hydra.sweep.dir
        try:
            summary = write_summary(sweep_dir)
        except DataError as error:  # jobs of another task (no trial.json): nothing to summarise
            log.info("%s", error)
            return
        best = summary.trials[0]
        log.info("sweep summary in %s; best: %s = %s with %s", sweep_dir, best.metric, best.value, best.overrides)
