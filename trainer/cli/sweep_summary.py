"""``lf-sweep-summary``: (re)write a sweep folder's summary table and plot.

Multiruns of ``lf-train`` write it when they end; run this for a sweep that was interrupted, or
for the folders of several parallel Optuna workers (``launch/sweep_gpus.sh``) together.

Examples::

    lf-sweep-summary sweep_dir=multirun/train/lr_optuna
    lf-sweep-summary sweep_dir=multirun/train/2026-11-27_10-00-00

Keys::

    sweep_dir   the folder of an lf-train -m sweep (multirun/train/<time>), or of several parallel workers
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from omegaconf import DictConfig

from trainer.cli.command import lf_command

if TYPE_CHECKING:
    from trainer.sweeps.summary import SweepSummary


def run_sweep_summary(cfg: DictConfig) -> SweepSummary:
    """Write the summary of the sweep in ``cfg.sweep_dir`` (``summary.md``, ``.csv``, ``.png``); print it."""
    from trainer.sweeps.summary import write_summary  # imports torch (a trial's record): when the job runs

    summary = write_summary(cfg.sweep_dir)
    print(summary.markdown.read_text(encoding="utf-8"))
    return summary


@lf_command("sweep_summary")
def main(cfg: DictConfig) -> None:
    """Console entry point."""
    run_sweep_summary(cfg)


if __name__ == "__main__":
    main()
