"""One sweep trial: run the training function, turn expected failures into a recorded result.

Every job of a Hydra multirun writes ``trial.json`` into its output folder (overrides, metric,
status, error); the sweep summary and the resumable Optuna sweeper read it. A trial that diverges
(NaN loss), runs out of memory, is pruned, or does not log the optimized metric is *recorded* as
failed or pruned and returns NaN, so the sweep goes on; any other error (a bad config, missing
data) still stops the sweep, since every later trial would hit it too.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from lf_common.atomic import write_json_atomic
from lf_common.errors import ConfigError
from trainer.callbacks.finite_loss import NonFiniteLossError

log = logging.getLogger(__name__)

TRIAL_FILE = "trial.json"
FAILED_VALUE = float("nan")
DIRECTIONS = ("minimize", "maximize")


class MissingMetricError(KeyError):
    """The run finished without logging the metric the sweep optimises."""


def _trial_failures() -> tuple[type[BaseException], ...]:
    """Exceptions that end one trial, not the sweep."""
    failures: list[type[BaseException]] = [NonFiniteLossError, torch.OutOfMemoryError]
    try:
        import optuna

        failures.append(optuna.TrialPruned)
    except ImportError:  # pragma: no cover - optuna is a dependency
        pass
    return tuple(failures)


@dataclass
class TrialRecord:
    """What one trial did, as written to ``trial.json``.

    Attributes:
        number: the Hydra job number within its sweep (``None`` outside a sweep).
        overrides: the job's command-line overrides (``key=value``).
        metric: the optimized metric's name, e.g. ``val/loss``.
        direction: ``minimize`` or ``maximize``.
        value: the metric's final value; ``None`` when the trial failed.
        status: ``complete``, ``failed`` or ``pruned``.
        error: why it failed or was pruned.
        global_step: optimizer steps done (``None`` when unknown).
        seconds: wall time of the trial.
    """

    number: int | None
    overrides: list[str]
    metric: str
    direction: str
    value: float | None
    status: str
    error: str | None = None
    global_step: int | None = None
    seconds: float = 0.0

    def params(self, exclude: tuple[str, ...] = ()) -> dict[str, str]:
        """The overrides as ``{key: value}`` (``+``/``++``/``~`` prefixes dropped)."""
        pairs = (o.split("=", 1) for o in self.overrides if "=" in o)
        return {k.lstrip("+~"): v for k, v in pairs if k.lstrip("+~") not in exclude}

    def write(self, folder: str | Path) -> Path:
        path = Path(folder) / TRIAL_FILE
        write_json_atomic(path, asdict(self))
        return path

    @classmethod
    def read(cls, path: str | Path) -> TrialRecord:
        """Read a ``trial.json``; fields this version does not know (from older files) are ignored."""
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        known = {f.name for f in fields(cls)}
        return cls(**{key: value for key, value in data.items() if key in known})


def in_sweep(multirun: bool) -> bool:
    """Whether this run is a sweep's trial: a job of a Hydra multirun, or a run a W&B sweep agent
    started (it sets ``WANDB_SWEEP_ID``). Only trials record ``trial.json`` and warn about a missing
    optimized metric; a plain run does neither."""
    return multirun or bool(os.environ.get("WANDB_SWEEP_ID"))


def check_direction(direction: str) -> str:
    """``direction`` when it is one of :data:`DIRECTIONS` (``minimize``, ``maximize``)."""
    if direction not in DIRECTIONS:
        raise ConfigError(f"optimized_direction must be one of {DIRECTIONS}, got {direction!r}")
    return direction


def run_trial(
    train: Callable[[], dict[str, Any]],
    *,
    metric: str,
    direction: str,
    output_dir: str | Path,
    overrides: list[str],
    number: int | None,
    catch_failures: bool,
) -> float:
    """Run ``train`` (returns the run's metrics) and record it as a trial in ``output_dir``.

    Args:
        train: runs the training; returns a dict holding ``metric`` (and ``global_step``).
        metric: the optimized metric's name.
        direction: ``minimize`` or ``maximize`` (stored for the summary).
        output_dir: where ``trial.json`` goes.
        overrides: the job's overrides, stored for the summary and for re-running the trial.
        number: the job number in its sweep.
        catch_failures: record expected failures and return NaN (in a sweep) instead of raising.

    Returns:
        The metric's value, or ``FAILED_VALUE`` (NaN) for a failed or pruned trial.
    """
    check_direction(direction)
    record = TrialRecord(number, list(overrides), metric, direction, value=None, status="failed")
    start = time.monotonic()
    try:
        metrics = train()
        record.global_step = metrics.get("global_step")
        value = metrics.get(metric)
        if value is None or not isinstance(value, (int, float)):
            logged = sorted(k for k, v in metrics.items() if isinstance(v, float))
            raise MissingMetricError(
                f"optimized_metric {metric!r} was not logged by this run (logged: {logged}); "
                "val/loss needs data.val_dir and a validation run (trainer.val_check_interval)"
            )
        if not math.isfinite(value):
            raise NonFiniteLossError(f"optimized_metric {metric!r} is {value}")
        record.value, record.status = float(value), "complete"
        return record.value
    except MissingMetricError as error:
        record.error = str(error)
        if catch_failures:
            log.warning("trial %s failed: %s", number, record.error)
        else:  # a plain run that trained fine: nothing to optimise, nothing failed
            record.status = "complete"
            log.warning("%s", record.error)
        return FAILED_VALUE
    except _trial_failures() as error:
        record.status = "pruned" if type(error).__name__ == "TrialPruned" else "failed"
        record.error = f"{type(error).__name__}: {error}"
        if not catch_failures:
            raise
        log.warning("trial %s %s: %s", number, record.status, record.error)
        return FAILED_VALUE
    except BaseException as error:
        record.error = f"{type(error).__name__}: {error}"
        raise
    finally:
        record.seconds = round(time.monotonic() - start, 3)
        if rank_zero_only.rank == 0:  # every rank of a multi-process run returns here
            record.write(output_dir)
