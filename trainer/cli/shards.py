"""``lf-shards``: write raw WebDataset shards (img2dataset's layout) from a source.

Examples::

    lf-shards source=digits out_dir=data/digits-train
    lf-shards source=digits source.split=heldout out_dir=data/digits-heldout
    lf-shards source=folder source.root=photos/ out_dir=data/photos samples_per_shard=500
    lf-shards source=folder source.root=cutouts/ out_dir=data/cutouts masks.from_alpha=true   # loss masks
    lf-shards source=table source.table=captions.csv out_dir=data/table on_bad_sample=skip
    lf-shards source=table source.table=laion.parquet source.path_column=file source.caption_column=text out_dir=...
    lf-shards source=img2dataset source.path=img2dataset_out    # validated in place, not rewritten

Keys::

    source           where the images and captions come from: digits | folder | table | img2dataset
    out_dir          the folder for shard-000000.tar, ... and shards_summary.json (or s3://bucket/prefix)
    samples_per_shard  samples in each shard
    on_bad_sample    error (stop at an image that does not decode) | skip (leave it out, count and log it)
    overwrite        replace shards already in out_dir
    masks.from_alpha an image's alpha channel is its loss mask (KEY.mask.png beside an image is always read)
"""

from __future__ import annotations

import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from data_pipelines.raw.sources.img2dataset import Img2DatasetFolder
from data_pipelines.raw.validate import problem_lines, report_table
from lf_common.atomic import write_json_atomic
from trainer.cli.command import lf_command


def run_shards(cfg: DictConfig) -> dict[str, Any]:
    """Write the configured source to shards; returns the summary as a dict.

    An img2dataset folder (``source=img2dataset``) is validated in place instead: its summary
    (with ``ok``) goes to ``out_dir/img2dataset_summary.json``, or into the folder itself when
    ``out_dir`` is not given.
    """
    source = instantiate(cfg.source)
    if isinstance(source, Img2DatasetFolder):
        return check_img2dataset(source, None if OmegaConf.is_missing(cfg, "out_dir") else cfg.out_dir)
    out_dir = cfg.out_dir  # a ??? is refused here, before the writer's imports (torch)
    from data_pipelines.raw.writer import write_raw_shards

    summary = write_raw_shards(
        source,
        out_dir,
        samples_per_shard=cfg.samples_per_shard,
        on_bad_sample=cfg.on_bad_sample,
        overwrite=cfg.overwrite,
        prefix=cfg.prefix,
        max_bytes_per_shard=cfg.max_bytes_per_shard,
        workers=cfg.workers,
        progress=cfg.progress,
        mask_from_alpha=cfg.masks.from_alpha,
    )
    masks = f" ({summary.masks} with a loss mask)" if summary.masks else ""
    print(
        f"shards: {summary.samples} samples{masks} in {len(summary.shards)} shards, "
        f"{summary.bytes / 1e6:.1f} MB, {summary.skipped} skipped -> {summary.out_dir}"
    )
    return asdict(summary)


def check_img2dataset(folder: Img2DatasetFolder, out_dir: str | None) -> dict[str, Any]:
    """Validate an img2dataset folder in place, print and write its summary; returns it as a dict."""
    summary = folder.check()
    print("\n".join([*report_table(summary.reports), *problem_lines(summary.reports)]))
    failed = summary.attempted - summary.status_counts.get("success", 0)
    print(
        f"img2dataset: {summary.samples} samples in {len(summary.shards)} shards, {summary.bytes / 1e6:.1f} MB; "
        f"{summary.attempted} URLs tried, {failed} failed {summary.status_counts}; "
        f"{'ok' if summary.ok else 'PROBLEMS in the shards (see the table)'}"
    )
    path = Path(out_dir or folder.path) / "img2dataset_summary.json"
    write_json_atomic(path, summary.to_dict())
    return summary.to_dict()


@lf_command("shards", may_stay_missing=("out_dir",))  # an img2dataset folder is checked in place
def main(cfg: DictConfig) -> None:
    """Console entry point; exit status 1 when an img2dataset folder has problems."""
    if not run_shards(cfg).get("ok", True):
        sys.exit(1)


if __name__ == "__main__":
    main()
