"""The shard-writing job: a source's image-caption pairs into raw WebDataset shards."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterable, Iterator, Sized
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from functools import partial
from itertools import islice
from pathlib import Path
from typing import Literal

from PIL import Image
from tqdm import tqdm

from data_pipelines.raw.format import (
    RawSample,
    alpha_mask_png,
    encode_raw_sample,
    loss_mask_png,
    normalize_image_bytes,
)
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
    masks: int = 0  # samples stored with a loss mask (KEY.mask.png)
    skipped: int = 0
    bytes: int = 0
    shards: list[str] = field(default_factory=list)
    skipped_origins: list[str] = field(default_factory=list)


Checked = tuple[bytes, str, bytes | None]
"""An item as it goes into a shard: ``(image bytes, extension, loss mask PNG or None)``."""


def _check(item: SourceItem, mask_from_alpha: bool = False) -> Checked | CorruptSampleError:
    """Decode-check one item and its loss mask (runs in worker processes); a bad one comes back as its error.

    The loss mask is the item's mask file when it has one, else (``mask_from_alpha``) the image's alpha channel
    when it has one, else none."""
    try:
        image_bytes, extension = normalize_image_bytes(item.image_bytes, item.origin)
        if item.mask_bytes is None and not mask_from_alpha:
            return image_bytes, extension, None
        with Image.open(io.BytesIO(image_bytes)) as image:
            if item.mask_bytes is not None:
                mask = loss_mask_png(item.mask_bytes, image.size, item.mask_origin or f"{item.origin} (its mask)")
            else:
                mask = alpha_mask_png(image)
        return image_bytes, extension, mask
    except CorruptSampleError as error:
        return error


def _checked(
    source: Iterable[SourceItem], workers: int, mask_from_alpha: bool = False
) -> Iterator[tuple[SourceItem, Checked | CorruptSampleError]]:
    """Items with their check results, in source order; ``workers > 1`` checks chunks in parallel
    (at most ``CHUNK`` items in memory at a time)."""
    check = partial(_check, mask_from_alpha=mask_from_alpha)
    if workers <= 1:
        for item in source:
            yield item, check(item)
        return
    with ProcessPoolExecutor(max_workers=workers) as pool:
        iterator = iter(source)
        while chunk := list(islice(iterator, CHUNK)):
            yield from zip(chunk, pool.map(check, chunk, chunksize=16), strict=True)


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
    mask_from_alpha: bool = False,
) -> ShardsSummary:
    """Write every item of ``source`` to raw shards in img2dataset's layout.

    Keys are the item's position among the written samples, zero-padded to nine digits, so the
    same source gives the same shards (also with several workers). Each image is decoded once to
    check it; JPEG, PNG and WebP bytes are stored as they are, other formats as PNG. A loss mask (the
    item's mask file, or with ``mask_from_alpha`` the image's alpha channel) is checked against its image
    (grayscale, same size) and stored as ``KEY.mask.png`` (mode L).

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
        mask_from_alpha: an image with an alpha channel and no mask file gets its alpha as its loss mask
            (transparent: ignored by the loss). Off by default: a transparent photo is not always a mask.

    Raises:
        DataError: bad input (named), or no sample could be written.
    """
    if on_bad_sample not in ("error", "skip"):
        raise ConfigError(f"on_bad_sample={on_bad_sample!r}: expected 'error' or 'skip'")
    summary = ShardsSummary(out_dir=str(out_dir))
    writer = AtomicShardWriter(out_dir, samples_per_shard, prefix, overwrite, max_bytes_per_shard)
    total = len(source) if isinstance(source, Sized) else None  # a total gives the bar its ETA
    with writer, tqdm(desc="shards", unit="img", total=total, disable=not progress) as bar:
        for item, checked in _checked(source, workers, mask_from_alpha):
            bar.update()
            if isinstance(checked, CorruptSampleError):
                if on_bad_sample == "error":
                    raise CorruptSampleError(
                        f"{checked}; set on_bad_sample=skip to leave such images out (counted and logged)"
                    ) from None
                log.warning("skipping %s", checked)
                summary.skipped += 1
                summary.skipped_origins.append(item.origin)
                continue
            image_bytes, extension, mask = checked
            sample = RawSample(f"{summary.samples:09d}", image_bytes, extension, item.caption, item.meta, mask)
            writer.write(encode_raw_sample(sample))
            summary.samples += 1
            summary.masks += mask is not None
    if summary.samples == 0:
        raise DataError(f"{out_dir}: no sample was written ({summary.skipped} skipped)")
    summary.shards = [str(shard.path) for shard in writer.shards]
    summary.bytes = sum(shard.num_bytes for shard in writer.shards)
    summary_bytes = (json.dumps(asdict(summary), indent=2, sort_keys=True) + "\n").encode("utf-8")
    object_store.write_path(object_store.join(str(out_dir), SUMMARY_NAME), summary_bytes)
    log.info(
        "wrote %d samples (%d with a loss mask) in %d shards (%.1f MB) to %s; skipped %d",
        summary.samples,
        summary.masks,
        len(summary.shards),
        summary.bytes / 1e6,
        out_dir,
        summary.skipped,
    )
    return summary
