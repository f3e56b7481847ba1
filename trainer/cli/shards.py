"""``lf-shards``: write raw WebDataset shards (img2dataset's layout) from a source.

Examples::

    lf-shards source=digits out_dir=data/digits-train
    lf-shards source=digits source.split=heldout out_dir=data/digits-heldout
    lf-shards source=folder source.root=photos/ out_dir=data/photos samples_per_shard=500
    lf-shards source=table source.table=captions.csv out_dir=data/table on_bad_sample=skip
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import hydra
from hydra.utils import instantiate
from omegaconf import DictConfig

from data_pipelines.raw_shards import write_raw_shards
from trainer.cli.hydra_app import CONF_DIR, VERSION_BASE


def run_shards(cfg: DictConfig) -> dict[str, Any]:
    """Write the configured source to shards; returns the summary as a dict."""
    summary = write_raw_shards(
        instantiate(cfg.source),
        cfg.out_dir,
        samples_per_shard=cfg.samples_per_shard,
        on_bad_sample=cfg.on_bad_sample,
        overwrite=cfg.overwrite,
        prefix=cfg.prefix,
        max_bytes_per_shard=cfg.max_bytes_per_shard,
        workers=cfg.workers,
        progress=cfg.progress,
    )
    print(
        f"shards: {summary.samples} samples in {len(summary.shards)} shards, "
        f"{summary.bytes / 1e6:.1f} MB, {summary.skipped} skipped -> {summary.out_dir}"
    )
    return asdict(summary)


@hydra.main(version_base=VERSION_BASE, config_path=CONF_DIR, config_name="shards")
def main(cfg: DictConfig) -> None:
    """Console entry point."""
    run_shards(cfg)


if __name__ == "__main__":
    main()
