"""Check raw shards before anything trains on them: every sample, every member, the tar itself."""

from __future__ import annotations

import io
import json
import tarfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from data_pipelines.raw.format import (
    CAPTION_KEY,
    IMAGE_EXTENSIONS,
    LOSS_MASK_KEY,
    META_KEY,
    check_loss_mask,
    failed_status,
)
from lf_common import object_store

PROBLEMS = {
    "undecodable": "image does not decode",
    "missing_image": "no image",
    "missing_caption": "no caption",
    "duplicate_keys": "duplicate key",
    "failed_status": "marked failed in KEY.json",
    "bad_mask": "loss mask mask.png not a grayscale (mode L) image of the image's size",
}
""":class:`ShardReport`'s lists of bad keys, and what each means."""
KEYS_SHOWN = 5
"""Bad sample keys printed per shard (the report file has them all)."""


@dataclass
class ShardReport:
    """What is wrong with one shard (empty lists and ``truncated=None`` when nothing is).

    Attributes:
        shard: the shard path.
        samples: distinct keys read.
        undecodable: keys whose image does not decode.
        missing_image: keys with no image member.
        missing_caption: keys with no ``txt`` member.
        duplicate_keys: keys whose members are not contiguous or appear twice.
        failed_status: keys whose ``KEY.json`` says the download failed (img2dataset's ``status``
            other than ``"success"``), or does not parse as JSON.
        bad_mask: keys whose loss mask (``mask.png``) does not decode, or is not grayscale (mode L) or not
            of its image's size.
        truncated: the tar error when the file ends early or is not a tar.
    """

    shard: str
    samples: int = 0
    undecodable: list[str] = field(default_factory=list)
    missing_image: list[str] = field(default_factory=list)
    missing_caption: list[str] = field(default_factory=list)
    duplicate_keys: list[str] = field(default_factory=list)
    failed_status: list[str] = field(default_factory=list)
    bad_mask: list[str] = field(default_factory=list)
    truncated: str | None = None

    @property
    def ok(self) -> bool:
        return not (
            self.undecodable
            or self.missing_image
            or self.missing_caption
            or self.duplicate_keys
            or self.failed_status
            or self.bad_mask
            or self.truncated
        )

    def key_problems(self) -> dict[str, list[str]]:
        """What is wrong with each bad sample, by key, in the order the problems were found."""
        problems: dict[str, list[str]] = {}
        for attribute, what in PROBLEMS.items():
            for key in getattr(self, attribute):
                problems.setdefault(key, []).append(what)
        return problems

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok, "bad_samples": len(self.key_problems())}


def _split(name: str) -> tuple[str, str]:
    """webdataset's rule: the key is the path up to the first dot of the file name."""
    folder, _, base = name.rpartition("/")
    stem, _, suffix = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), suffix


def validate_shard(path: str | Path) -> ShardReport:
    """Read every member of a raw shard (a local file or an object-store URL, streamed) and decode every image."""
    report = ShardReport(shard=str(path))
    seen: set[str] = set()
    current: str | None = None
    members: dict[str, bytes] = {}

    def finish(key: str | None) -> None:
        if key is None:
            return
        report.samples += 1
        image_ext = next((ext for ext in IMAGE_EXTENSIONS if ext in members), None)
        image_size = None
        if image_ext is None:
            report.missing_image.append(key)
        else:
            try:
                with Image.open(io.BytesIO(members[image_ext])) as image:
                    image.load()
                    image_size = image.size
            except Exception:
                report.undecodable.append(key)
        if LOSS_MASK_KEY in members and not _mask_fits(members[LOSS_MASK_KEY], image_size):
            report.bad_mask.append(key)
        if CAPTION_KEY not in members:
            report.missing_caption.append(key)
        if META_KEY in members:
            try:
                status = failed_status(json.loads(members[META_KEY]))
            except ValueError:
                status = "KEY.json is not valid JSON"
            if status is not None:
                report.failed_status.append(key)

    try:
        with _open(path) as stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, suffix = _split(member.name)
                if key != current:
                    finish(current)
                    if key in seen:
                        report.duplicate_keys.append(key)
                    seen.add(key)
                    current, members = key, {}
                elif suffix in members:
                    report.duplicate_keys.append(key)
                handle = tar.extractfile(member)
                members[suffix] = handle.read() if handle else b""
        finish(current)
        if not _ends_with_end_marker(path):
            report.truncated = "no end-of-archive marker: the file was cut short"
    except (tarfile.TarError, EOFError, OSError, object_store.ObjectStoreError) as error:
        report.truncated = f"{type(error).__name__}: {error}"
    return report


def _mask_fits(data: bytes, image_size: tuple[int, int] | None) -> bool:
    """Whether a ``mask.png`` member decodes as a grayscale image of its image's ``(width, height)``
    (``None``: the image is missing or broken, which is reported on its own)."""
    try:
        with Image.open(io.BytesIO(data)) as mask:
            mask.load()
            if image_size is not None:
                check_loss_mask(mask, image_size, "mask")
    except Exception:
        return False
    return True


def _open(path: str | Path) -> Any:
    """A binary stream of a local file or an object-store URL."""
    return object_store.open_path(path)


def _ends_with_end_marker(path: str | Path) -> bool:
    """A complete tar ends with two zero blocks (1,024 zero bytes) and is a whole number of blocks.
    Python's tarfile reads a tar cut at a member boundary without complaint; this catches it."""
    with _open(path) as handle:
        size = handle.seek(0, io.SEEK_END)
        if size < 1024 or size % 512:
            return False
        handle.seek(size - 1024)
        return handle.read(1024) == bytes(1024)


def validate_shards(paths: list[str]) -> list[ShardReport]:
    """Reports for every shard, in order."""
    return [validate_shard(path) for path in paths]


def report_table(reports: list[ShardReport]) -> list[str]:
    """The reports as lines of a table, one shard a line, under a header."""
    lines = [
        f"{'shard':<50} {'samples':>8} {'bad image':>9} {'no image':>8} {'no caption':>10} {'dup key':>7} "
        f"{'failed':>6} {'bad mask':>8}  tar"
    ]
    for r in reports:
        tar = "ok" if r.truncated is None else f"BROKEN ({r.truncated})"
        lines.append(
            f"{r.shard[-50:]:<50} {r.samples:>8} {len(r.undecodable):>9} {len(r.missing_image):>8} "
            f"{len(r.missing_caption):>10} {len(r.duplicate_keys):>7} {len(r.failed_status):>6} "
            f"{len(r.bad_mask):>8}  {tar}"
        )
    return lines


def problem_lines(reports: list[ShardReport], shown: int = KEYS_SHOWN) -> list[str]:
    """One line per shard with problems: its bad sample keys (the first ``shown``, with what is wrong),
    their count, and a broken tar."""
    lines = []
    for report in reports:
        if report.ok:
            continue
        problems = report.key_problems()
        keys = [f"{key} ({', '.join(what)})" for key, what in list(problems.items())[:shown]]
        more = f", and {len(problems) - shown} more" if len(problems) > shown else ""
        samples = f"{_count(len(problems), 'bad sample')}: {', '.join(keys)}{more}" if problems else ""
        tar = f"tar BROKEN ({report.truncated})" if report.truncated else ""
        lines.append(f"{report.shard}: {'; '.join(part for part in (samples, tar) if part)}")
    return lines


def summary_line(reports: list[ShardReport]) -> str:
    """``N shards, S samples; B shards with problems, M bad samples``."""
    samples = sum(r.samples for r in reports)
    bad_shards = sum(not r.ok for r in reports)
    bad_samples = sum(len(r.key_problems()) for r in reports)
    return (
        f"{_count(len(reports), 'shard')}, {_count(samples, 'sample')}; "
        f"{_count(bad_shards, 'shard')} with problems, {_count(bad_samples, 'bad sample')}"
    )


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}{'' if number == 1 else 's'}"
