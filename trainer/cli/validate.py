"""``lf-validate``: check raw shards (yours, or img2dataset's output) before training on them.

Per shard: samples, undecodable images, samples without image or caption, duplicate keys, samples
marked failed in KEY.json (img2dataset's status), and a truncated or unreadable tar. Prints a
table, writes a JSON report when ``report=`` is set, and exits with status 1 when anything is wrong.

Examples::

    lf-validate shards=data/raw
    lf-validate shards='img2dataset_out/{00000..00099}.tar' report=validation.json
"""

from __future__ import annotations

import sys
from typing import Any

import hydra
from omegaconf import DictConfig

from data_pipelines.raw.validate import report_table, validate_shards
from data_pipelines.shards.listing import resolve_shards
from lf_common.atomic import write_json_atomic
from trainer.cli.hydra_app import CONF_DIR, VERSION_BASE


def run_validate(cfg: DictConfig) -> dict[str, Any]:
    """Validate the configured shards; returns ``{"ok": bool, "shards": [report, ...]}``."""
    reports = validate_shards(resolve_shards(cfg.shards))
    print("\n".join(report_table(reports)))
    result = {"ok": all(r.ok for r in reports), "shards": [r.to_dict() for r in reports]}
    bad = sum(not r.ok for r in reports)
    print(f"validate: {len(reports)} shards, {sum(r.samples for r in reports)} samples, {bad} with problems")
    if cfg.get("report"):
        write_json_atomic(cfg.report, result)
    return result


@hydra.main(version_base=VERSION_BASE, config_path=CONF_DIR, config_name="validate")
def main(cfg: DictConfig) -> None:
    """Console entry point; exit status 1 when any shard has a problem."""
    if not run_validate(cfg)["ok"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
