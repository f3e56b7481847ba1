"""``lf-validate``: check raw shards (yours, or img2dataset's output) before training on them.

Per shard: samples, undecodable images, samples without image or caption, duplicate keys, samples
marked failed in KEY.json (img2dataset's status), loss masks (KEY.mask.png) that are not grayscale or not
of their image's size, and a truncated or unreadable tar. Prints a
table, the first bad sample keys of each shard with what is wrong, and "N shards with problems, M
bad samples"; writes a JSON report with every bad key when ``report=`` is set; exits with status 1
when anything is wrong.

Examples::

    lf-validate shards=data/raw
    lf-validate shards='img2dataset_out/{00000..00099}.tar' report=validation.json

Keys::

    shards     a folder of .tar shards, a glob, a brace pattern, or a list; or s3:// (any fsspec URL) of these
    s3_endpoint_url  an S3-compatible store's endpoint (default: AWS_ENDPOINT_URL_S3, else AWS)
    report     a JSON file for the per-shard report (every bad sample key)
"""

from __future__ import annotations

import sys
from typing import Any

from omegaconf import DictConfig

from data_pipelines.raw.validate import problem_lines, report_table, summary_line, validate_shards
from data_pipelines.shards.listing import resolve_shards
from lf_common.atomic import write_json_atomic
from trainer.cli.command import lf_command


def run_validate(cfg: DictConfig) -> dict[str, Any]:
    """Validate the configured shards; returns ``{"ok": bool, "shards": [report, ...]}``."""
    reports = validate_shards(resolve_shards(cfg.shards))
    print("\n".join([*report_table(reports), *problem_lines(reports)]))
    result = {"ok": all(r.ok for r in reports), "shards": [r.to_dict() for r in reports]}
    print(f"validate: {summary_line(reports)}")
    if cfg.get("report"):
        write_json_atomic(cfg.report, result)
        print(f"report (every bad sample key): {cfg.report}")
    return result


@lf_command("validate")
def main(cfg: DictConfig) -> None:
    """Console entry point; exit status 1 when any shard has a problem."""
    if not run_validate(cfg)["ok"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
