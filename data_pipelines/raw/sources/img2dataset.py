"""An img2dataset output folder used as raw shards as it is: validated in place, never rewritten.

img2dataset (``--output_format webdataset``) writes, per shard::

    00000.tar            KEY.jpg  KEY.txt  KEY.json   (the successful downloads)
    00000.parquet        one row per URL tried: url, caption, key, status, error_message, width, ...
    00000_stats.json     count, successes, failed_to_download, failed_to_resize, status_dict, ...

Its tars already are raw shards (the layout :mod:`data_pipelines.raw.format` defines), so
``lf-precompute`` reads the folder directly; this module checks it and summarises it.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from data_pipelines.raw.validate import ShardReport, validate_shard
from lf_common.errors import DataError

log = logging.getLogger(__name__)
STATUS_SUCCESS = "success"
EXAMPLES_KEPT = 20  # failed URLs listed in the summary (the counts cover all)


@dataclass
class Img2DatasetSummary:
    """What an img2dataset folder holds and what is wrong with it.

    Attributes:
        path: the folder.
        shards: the tar shards, sorted.
        samples: samples in the tars.
        bytes: bytes of the tars.
        attempted: URLs img2dataset tried (from its ``*.parquet`` tables, or its ``*_stats.json``).
        status_counts: how many of those ended with each status (``success``, ``failed_to_download``...).
        failed_examples: up to 20 failed rows (url, key, status, error_message), for a look.
        reports: the validation report of every tar (see :mod:`data_pipelines.raw.validate`).
        ok: every tar validates (failed downloads that img2dataset left out of the tars are normal
            and do not count against it).
    """

    path: str
    shards: list[str] = field(default_factory=list)
    samples: int = 0
    bytes: int = 0
    attempted: int = 0
    status_counts: dict[str, int] = field(default_factory=dict)
    failed_examples: list[dict[str, Any]] = field(default_factory=list)
    reports: list[ShardReport] = field(default_factory=list)
    ok: bool = True

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict (each report with its ``ok``)."""
        return {**asdict(self), "reports": [r.to_dict() for r in self.reports]}


class Img2DatasetFolder:
    """An img2dataset output folder.

    Args:
        path: the folder img2dataset wrote (``output_folder``).
    """

    def __init__(self, path: str) -> None:
        self.path = Path(path)

    def shards(self) -> list[Path]:
        """The ``*.tar`` shards, sorted.

        Raises:
            DataError: the folder is missing or holds no tar.
        """
        if not self.path.is_dir():
            raise DataError(f"{self.path}: img2dataset output folder does not exist")
        shards = sorted(self.path.glob("*.tar"))
        if not shards:
            raise DataError(f"{self.path}: holds no .tar shards (was img2dataset run with --output_format webdataset?)")
        return shards

    def check(self) -> Img2DatasetSummary:
        """Validate every tar in place and read img2dataset's own records of what it tried."""
        summary = Img2DatasetSummary(path=str(self.path))
        reports: list[ShardReport] = []
        for shard in self.shards():
            report = validate_shard(shard)
            reports.append(report)
            summary.shards.append(str(shard))
            summary.samples += report.samples
            summary.bytes += shard.stat().st_size
        statuses: Counter[str] = Counter()
        for shard in self.shards():
            self._count_attempts(shard, statuses, summary.failed_examples)
        summary.attempted = sum(statuses.values())
        summary.status_counts = dict(sorted(statuses.items()))
        summary.reports = reports
        summary.ok = all(r.ok for r in reports)
        return summary

    def _count_attempts(self, shard: Path, statuses: Counter[str], examples: list[dict[str, Any]]) -> None:
        """Add the statuses of the URLs behind ``shard`` (its ``.parquet`` table, else its ``_stats.json``)."""
        table = shard.with_suffix(".parquet")
        stats = shard.with_name(shard.stem + "_stats.json")
        if table.is_file():
            import pyarrow.parquet as pq

            parquet = pq.ParquetFile(table)
            names = parquet.schema_arrow.names
            if "status" not in names:
                raise DataError(f"{table}: column 'status' is missing (the table has {names})")
            wanted = [c for c in ("url", "key", "status", "error_message") if c in names]
            for batch in parquet.iter_batches(batch_size=4096, columns=wanted):
                for row in batch.to_pylist():
                    statuses[str(row["status"])] += 1
                    if row["status"] != STATUS_SUCCESS and len(examples) < EXAMPLES_KEPT:
                        examples.append({"table": table.name, **row})
        elif stats.is_file():
            try:
                data = json.loads(stats.read_text(encoding="utf-8"))
            except json.JSONDecodeError as error:
                raise DataError(f"{stats}: not valid JSON ({error})") from error
            for status, count in (data.get("status_dict") or {}).items():
                statuses[str(status)] += int(count)
        else:
            log.warning("%s: neither %s nor %s found; attempts not counted", shard, table.name, stats.name)
