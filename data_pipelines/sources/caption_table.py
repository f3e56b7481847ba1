"""A CSV or JSON-lines table of image paths and captions."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from data_pipelines.errors import DataError
from data_pipelines.sources.base import SourceItem


class CaptionTableSource:
    """Rows of ``path,caption`` from a ``.csv``, ``.tsv`` or ``.jsonl`` file.

    Relative image paths are taken relative to the table's folder.

    Args:
        table: the table file.
        path_column: the column holding image paths.
        caption_column: the column holding captions.
    """

    def __init__(self, table: str, path_column: str = "path", caption_column: str = "caption") -> None:
        self.table = Path(table)
        self.path_column = path_column
        self.caption_column = caption_column

    def rows(self) -> Iterator[tuple[int, dict[str, Any]]]:
        """``(line number, row)`` for each row of the table.

        Raises:
            DataError: the table is missing, of an unknown kind, or a JSON line does not parse.
        """
        if not self.table.is_file():
            raise DataError(f"{self.table}: caption table does not exist")
        suffix = self.table.suffix.lower()
        with self.table.open(encoding="utf-8", newline="") as handle:
            if suffix in (".csv", ".tsv"):
                reader = csv.DictReader(handle, delimiter="\t" if suffix == ".tsv" else ",")
                for row in reader:
                    yield reader.line_num, row
            elif suffix in (".jsonl", ".ndjson"):
                for line_number, line in enumerate(handle, start=1):
                    if not line.strip():
                        continue
                    try:
                        yield line_number, json.loads(line)
                    except json.JSONDecodeError as error:
                        raise DataError(f"{self.table}:{line_number}: not a JSON object ({error})") from error
            else:
                raise DataError(f"{self.table}: unknown table kind {suffix!r}; expected .csv, .tsv or .jsonl")

    def __iter__(self) -> Iterator[SourceItem]:
        count = 0
        for line_number, row in self.rows():
            where = f"{self.table}:{line_number}"
            for column in (self.path_column, self.caption_column):
                if column not in row or row[column] is None:
                    raise DataError(f"{where}: key '{column}' is missing (row has {sorted(row)})")
            image_path = Path(row[self.path_column])
            if not image_path.is_absolute():
                image_path = self.table.parent / image_path
            if not image_path.is_file():
                raise DataError(f"{where}: image file {image_path} does not exist")
            extra = {k: v for k, v in row.items() if k not in (self.path_column, self.caption_column)}
            count += 1
            yield SourceItem(
                origin=f"{where} ({image_path})",
                image_bytes=image_path.read_bytes(),
                caption=str(row[self.caption_column]).strip(),
                meta={"source_path": str(row[self.path_column]), **extra},
            )
        if count == 0:
            raise DataError(f"{self.table}: the table has no rows")
