"""``lf-dedup``: find exact and near-duplicate images in raw shards, report them, and write the
shards without them (the first of each group is kept).

Exact: the same pixels. Near: a perceptual hash (imagehash) searched with faiss, each candidate
confirmed on aligned thumbnails (re-encoded, resized and slightly shifted copies). Optionally,
image embeddings closer than a cosine similarity (``embedding=`` a feature extractor, e.g. a local
CLIP). Prints the groups, writes ``dedup_report.json`` (what was dropped and why) next to the
shards, or to ``report=``. See :mod:`data_pipelines.raw.dedup`.

Examples::

    lf-dedup shards=data/raw out_dir=data/raw-dedup
    lf-dedup shards='data/raw/shard-{000000..000099}.tar' out_dir=data/dedup workers=8
    lf-dedup shards=data/raw out_dir=null report=dups.json            # a dry run: the report only
    lf-dedup shards=data/raw out_dir=data/dedup +features@embedding=clip embedding.folder=models/clip min_cosine=0.96
    lf-dedup shards=s3://bucket/raw/ out_dir=s3://bucket/raw-dedup   # streamed; each shard uploaded whole, report last

Keys::

    shards              raw shards: a folder of .tar, a glob, a brace pattern, or a list (s3://... too, streamed)
    out_dir             the deduplicated shards; null: a dry run (the report only); s3://... too
    report              the JSON report (default out_dir/dedup_report.json); s3://... too
    workers             processes hashing shards in parallel
    max_hash_distance   near-duplicate candidates: perceptual hashes at most this many bits apart
    min_cosine          with embedding=: duplicates by embedding cosine similarity
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import numpy as np
from hydra.utils import instantiate
from omegaconf import DictConfig

from data_pipelines.shards.listing import resolve_shards
from lf_common import object_store
from trainer.cli.command import lf_command

if TYPE_CHECKING:  # torch is imported when the job runs, so --help and config errors answer at once
    from data_pipelines.raw.dedup import Embedder
    from trainer.evaluation.features import FeatureExtractor

REPORT_NAME = "dedup_report.json"
SHOWN_GROUPS = 20


def embedder(extractor: FeatureExtractor, size: int) -> Embedder:
    """Images -> the extractor's features ``(B, D)`` (images fitted to ``size`` squares first)."""
    from trainer.evaluation.features import images_to_tensor
    from trainer.evaluation.reference import fit_image

    def embed(images: list) -> np.ndarray:
        batch = images_to_tensor([fit_image(image, (size, size)) for image in images])
        return extractor(batch).detach().cpu().numpy()

    return embed


def run_dedup(cfg: DictConfig) -> dict[str, Any]:
    """Deduplicate the configured shards; returns the report as a dict (also written as JSON, after the
    shards: with an ``s3://`` ``out_dir`` each shard is uploaded whole when complete, the report last)."""
    from data_pipelines.raw.dedup import dedup_shards, shard_folder

    shards = resolve_shards(cfg.shards)
    path = str(cfg.report or object_store.join(str(cfg.out_dir or shard_folder(shards[0])), REPORT_NAME))
    for target in (cfg.out_dir, path):
        if target:  # a bucket: checked before the search, not at the first upload
            object_store.require_writable(str(target), "an existing bucket to write to")
    embed = embedder(instantiate(cfg.embedding).eval(), cfg.embedding_size) if cfg.get("embedding") else None
    report = dedup_shards(
        shards,
        cfg.out_dir,
        samples_per_shard=cfg.samples_per_shard,
        prefix=cfg.prefix,
        overwrite=cfg.overwrite,
        max_hash_distance=cfg.max_hash_distance,
        max_pixel_difference=cfg.max_pixel_difference,
        shift=cfg.shift,
        embed=embed,
        min_cosine=cfg.min_cosine,
        workers=cfg.workers,
    ).to_dict()
    for group in report["groups"][:SHOWN_GROUPS]:
        found = ", ".join(f"{d['sample']} ({d['reason']})" for d in group["duplicates"])
        print(f"{group['kept']} <- {found}")
    if len(report["groups"]) > SHOWN_GROUPS:
        print(f"... and {len(report['groups']) - SHOWN_GROUPS} more groups")
    object_store.write_path(path, (json.dumps(report, indent=2, sort_keys=True) + "\n").encode("utf-8"))
    print(
        f"dedup: {report['samples']} samples, {report['dropped']} dropped in {len(report['groups'])} groups "
        f"{report['by_reason']}, {report['kept']} kept -> {cfg.out_dir or '(dry run)'}; report {path}"
    )
    return {**report, "report": str(path)}


@lf_command("dedup")
def main(cfg: DictConfig) -> None:
    """Console entry point."""
    run_dedup(cfg)


if __name__ == "__main__":
    main()
