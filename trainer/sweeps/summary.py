"""The end-of-sweep summary: every trial's overrides and metric, best first, and a plot.

Reads the ``trial.json`` each job wrote (anywhere below the sweep folder, so the folders of
several parallel Optuna workers combine) and writes ``summary.md``, ``summary.csv`` and
``summary.png`` (the metric against each swept parameter) into the sweep folder.
"""

from __future__ import annotations

import csv
import io
import logging
import math
from dataclasses import dataclass
from pathlib import Path

from lf_common.atomic import atomic_path
from lf_common.errors import DataError
from trainer.sweeps.trial import TRIAL_FILE, TrialRecord

log = logging.getLogger(__name__)

# Overrides that differ between trials but are bookkeeping, not hyperparameters.
HIDDEN_KEYS = ("optuna_trial_number", "output_dir", "hydra.run.dir", "hydra.sweep.dir")
STATUS_ORDER = {"complete": 0, "pruned": 1, "failed": 2}


def collect_trials(sweep_dir: str | Path) -> list[TrialRecord]:
    """Every ``trial.json`` below ``sweep_dir``, in folder order."""
    return [TrialRecord.read(path) for path in sorted(Path(sweep_dir).rglob(TRIAL_FILE))]


def rank_trials(trials: list[TrialRecord]) -> list[TrialRecord]:
    """Best first: complete trials by value (in their direction), then pruned, then failed."""

    def key(trial: TrialRecord) -> tuple[int, float]:
        value = trial.value if trial.value is not None and math.isfinite(trial.value) else math.inf
        if trial.status == "complete" and trial.direction == "maximize":
            value = -value
        return STATUS_ORDER.get(trial.status, 3), value

    return sorted(trials, key=key)


def swept_parameters(trials: list[TrialRecord]) -> list[str]:
    """The override keys whose values differ between trials (in first-seen order)."""
    values: dict[str, set[str | None]] = {}
    for trial in trials:
        params = trial.params(exclude=HIDDEN_KEYS)
        for key in params:
            values.setdefault(key, set())
        for key in values:
            values[key].add(params.get(key))
    return [key for key, seen in values.items() if len(seen) > 1]


@dataclass
class SweepSummary:
    """Paths of the files :func:`write_summary` wrote, and the ranked trials."""

    markdown: Path
    csv: Path
    plot: Path | None
    trials: list[TrialRecord]


def write_summary(sweep_dir: str | Path) -> SweepSummary:
    """Write ``summary.md``, ``summary.csv`` and ``summary.png`` into ``sweep_dir``.

    Raises:
        DataError: no ``trial.json`` below ``sweep_dir``.
    """
    sweep_dir = Path(sweep_dir)
    trials = rank_trials(collect_trials(sweep_dir))
    if not trials:
        where = "does not exist" if not sweep_dir.is_dir() else f"holds no {TRIAL_FILE}"
        raise DataError(
            f"sweep_dir={sweep_dir}: {where}; give the folder of an lf-train -m sweep (multirun/train/<time>)"
        )
    params = swept_parameters(trials)
    metric = trials[0].metric
    header = ["rank", "trial", "status", metric, *params, "steps", "seconds", "error"]
    rows = [
        [
            str(rank),
            "" if t.number is None else str(t.number),
            t.status,
            "" if t.value is None else f"{t.value:.6g}",
            *(t.params(exclude=HIDDEN_KEYS).get(p, "") for p in params),
            "" if t.global_step is None else str(t.global_step),
            f"{t.seconds:.1f}",
            t.error or "",
        ]
        for rank, t in enumerate(trials, start=1)
    ]
    markdown = sweep_dir / "summary.md"
    with atomic_path(markdown) as tmp:
        tmp.write_text(_markdown_table(trials[0].direction, metric, header, rows), encoding="utf-8")
    table = sweep_dir / "summary.csv"
    with atomic_path(table) as tmp:
        buffer = io.StringIO()
        csv.writer(buffer).writerows([header, *rows])
        tmp.write_text(buffer.getvalue(), encoding="utf-8")
    plot = _plot(sweep_dir / "summary.png", trials, params, metric) if params else None
    log.info("sweep summary: %s (%d trials)", markdown, len(trials))
    return SweepSummary(markdown, table, plot, trials)


def _markdown_table(direction: str, metric: str, header: list[str], rows: list[list[str]]) -> str:
    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in cells) + " |"

    lines = [
        f"# Sweep summary: {metric} ({direction}), best first",
        "",
        line(header),
        line(["---"] * len(header)),
        *(line(r) for r in rows),
        "",
    ]
    return "\n".join(lines)


def _as_number(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def _plot(path: Path, trials: list[TrialRecord], params: list[str], metric: str) -> Path:
    """One panel per swept parameter: the metric of each complete trial against its value."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    complete = [t for t in trials if t.status == "complete" and t.value is not None]
    fig, axes = plt.subplots(1, len(params), figsize=(4 * len(params), 3.2), squeeze=False)
    for ax, param in zip(axes[0], params, strict=True):
        raw = [t.params(exclude=HIDDEN_KEYS).get(param, "") for t in complete]
        numbers = [_as_number(v) for v in raw]
        values = [t.value for t in complete]
        if raw and all(n is not None for n in numbers):
            xs = [float(n) for n in numbers if n is not None]
            ax.scatter(xs, values)
            positive = [x for x in xs if x > 0]
            if len(positive) == len(xs) and max(xs) / min(xs) >= 100:
                ax.set_xscale("log")
            if complete:
                ax.scatter([xs[0]], [values[0]], marker="*", s=200, color="tab:red", label="best")
                ax.legend(loc="best")
        else:  # categorical
            labels = sorted(set(raw))
            ax.scatter([labels.index(v) for v in raw], values)
            ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
        ax.set_xlabel(param)
        ax.set_ylabel(metric)
    failed = len(trials) - len(complete)
    fig.suptitle(f"{len(complete)} complete trials" + (f", {failed} failed or pruned (not shown)" if failed else ""))
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return path
