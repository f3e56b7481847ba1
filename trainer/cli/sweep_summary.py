"""``lf-sweep-summary``: (re)write a sweep folder's summary table and plot.

Multiruns of ``lf-train`` write it when they end; run this for a sweep that was interrupted, or
for the folders of several parallel Optuna workers (``launch/sweep_gpus.sh``) together::

    lf-sweep-summary sweep_dir=multirun/train/lr_optuna
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from trainer.cli.hydra_app import CONF_DIR, VERSION_BASE
from trainer.sweeps.summary import SweepSummary, write_summary


def run_sweep_summary(cfg: DictConfig) -> SweepSummary:
    summary = write_summary(cfg.sweep_dir)
    print(summary.markdown.read_text(encoding="utf-8"))
    return summary


@hydra.main(version_base=VERSION_BASE, config_path=CONF_DIR, config_name="sweep_summary")
def main(cfg: DictConfig) -> None:
    run_sweep_summary(cfg)


if __name__ == "__main__":
    main()
