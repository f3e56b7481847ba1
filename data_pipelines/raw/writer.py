"""The shard-writing job: a source's image-caption pairs into raw WebDataset shards."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Iterator, Sized
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from itertools import islice
from pathlib import Path
from typing import Literal

from tqdm import tqdm

from data_pipelines.raw.format import RawSample, encode_raw_sample, normalize_image_bytes
from data_pipelines.raw.sources.base import SourceItem
from data_pipelines.shards.tar_writer import AtomicShardWriter
from lf_common import object_store
from lf_common.errors import ConfigError, CorruptSampleError, DataError

log = logging.getLogger(__name__)
SUMMARY_NAME = "shards_summary.json"
CHUNK = 1024  # items checked in parallel at a time


@dataclass
class ShardsSummary:
    """What a shard-writing run wrote and left out."""

    out_dir: str
    samples: int = 0
    skipped: int = 0
    bytes: int = 0
    shards: list[str] = field(default_factory=list)
    skipped_origins: list[str] = field(default_factory=list)


def _check(item: SourceItem) -> tuple[bytes, str] | CorruptSampleError:
    """Decode-check one item (runs in worker processes); a bad image comes back as its error."""
    try:
        return normalize_image_bytes(item.image_bytes, item.origin)
    except CorruptSampleError as error:
        return error


def _checked(
    source: Iterable[SourceItem], workers: int
) -> Iterator[tuple[SourceItem, tuple[bytes, str] | CorruptSampleError]]:
    """Items with their check results, in source order; ``workers > 1`` checks chunks in parallel
    (at most ``CHUNK`` items in memory at a time)."""
    if workers <= 1:
        for item in source:
            yield item, _check(item)
        return
    with ProcessPoolExecutor(max_workers=workers) as pool:
        iterator = iter(source)
        while chunk := list(islice(iterator, CHUNK)):
            yield from zip(chunk, pool.map(_check, chunk, chunksize=16), strict=True)


def write_raw_shards(
    source: Iterable[SourceItem],
    out_dir: str | Path,
    samples_per_shard: int = 1000,
    on_bad_sample: Literal["error", "skip"] = "error",
    overwrite: bool = False,
    prefix: str = "shard",
    max_bytes_per_shard: int | None = None,
    workers: int = 1,
    progress: bool = False,
) -> ShardsSummary:
    """Write every item of ``source`` to raw shards in img2dataset's layout.

    Keys are the item's position among the written samples, zero-padded to nine digits, so the
    same source gives the same shards (also with several workers). Each image is decoded once to
    check it; JPEG, PNG and WebP bytes are stored as they are, other formats as PNG.

    Args:
        source: the items, in order.
        out_dir: output folder; a ``shards_summary.json`` is written there too.
        samples_per_shard: samples per shard.
        on_bad_sample: ``"error"`` stops at an image that does not decode (naming it);
            ``"skip"`` leaves it out, logs it and counts it in the summary.
        overwrite: replace shards already in ``out_dir``.
        prefix: shard file name prefix.
        max_bytes_per_shard: also start a new shard at this size.
        workers: processes that decode-check images.
        progress: show a progress bar.

    Raises:
        DataError: bad input (named), or no sample could be written.
    """
    if on_bad_sample not in ("error", "skip"):
        raise ConfigError(f"on_bad_sample={on_bad_sample!r}: expected 'error' or 'skip'")
    summary = ShardsSummary(out_dir=str(out_dir))
    writer = AtomicShardWriter(out_dir, samples_per_shard, prefix, overwrite, max_bytes_per_shard)
    total = len(source) if isinstance(source, Sized) else None  # a total gives the bar its ETA
    with writer, tqdm(desc="shards", unit="img", total=total, disable=not progress) as bar:
        for item, checked in _checked(source, workers):
            bar.update()
            if isinstance(checked, CorruptSampleError):
                if on_bad_sample == "error":
                    raise CorruptSampleError(
                        f"{checked}; set on_bad_sample=skip to leave such images out (counted and logged)"
                    ) from None
                log.warning("skipping %s: image does not decode", item.origin)
                summary.skipped += 1
                summary.skipped_origins.append(item.origin)
                continue
            image_bytes, extension = checked
            sample = RawSample(f"{summary.samples:09d}", image_bytes, extension, item.caption, item.meta)
            writer.write(encode_raw_sample(sample))
            summary.samples += 1
    if summary.samples == 0:
        raise DataError(f"{out_dir}: no sample was written ({summary.skipped} skipped)")
    summary.shards = [str(shard.path) for shard in writer.shards]
    summary.bytes = sum(shard.num_bytes for shard in writer.shards)
    summary_bytes = (json.dumps(asdict(summary), indent=2, sort_keys=True) + "\n").encode("utf-8")
    object_store.write_path(object_store.join(str(out_dir), SUMMARY_NAME), summary_bytes)
    log.info(
        "wrote %d samples in %d shards (%.1f MB) to %s; skipped %d",
        summary.samples,
        len(summary.shards),
        summary.bytes / 1e6,
        out_dir,
        summary.skipped,
    )
    return summary
