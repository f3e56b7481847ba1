"""A table of image paths and captions: CSV, TSV, JSON lines or Parquet.

Parquet tables are read in row batches (``pyarrow``'s ``iter_batches``), so memory stays bounded
whatever the table's size; the other kinds are read line by line.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from data_pipelines.raw.captions import CAPTIONS_META_KEY
from data_pipelines.raw.sources.base import SourceItem
from lf_common.errors import DataError

TABLE_SUFFIXES = (".csv", ".tsv", ".jsonl", ".ndjson", ".parquet")


def _json_safe(value: Any) -> Any:
    """A value as it can go into ``KEY.json``: JSON types as they are, bytes dropped, others as text."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items() if not isinstance(v, (bytes, bytearray))}
    return str(value)


class CaptionTableSource:
    """Rows of ``path,caption`` from a ``.csv``, ``.tsv``, ``.jsonl`` or ``.parquet`` file.

    Relative image paths are taken relative to the table's folder. In a Parquet table the path
    column may instead hold the image itself: bytes, or a ``{"bytes": ..., "path": ...}`` struct
    (the layout of Hugging Face ``datasets`` image columns). Other columns go into ``KEY.json``.

    Args:
        table: the table file.
        path_column: the column holding image paths (or image bytes, in Parquet).
        caption_column: the column holding captions.
        batch_rows: rows read at a time from a Parquet table.
        extra_caption_columns: further columns holding other captions of the same image: the sample's
            ``KEY.json`` then lists them all under ``captions`` (caption column first), which precompute's
            ``captions.variants`` embeds as caption variants; an empty cell is left out.
    """

    def __init__(
        self,
        table: str,
        path_column: str = "path",
        caption_column: str = "caption",
        batch_rows: int = 1024,
        extra_caption_columns: list[str] | tuple[str, ...] = (),
    ) -> None:
        self.table = Path(table)
        self.path_column = path_column
        self.caption_column = caption_column
        self.batch_rows = batch_rows
        self.extra_caption_columns = tuple(extra_caption_columns)

    def rows(self) -> Iterator[tuple[int, dict[str, Any]]]:
        """``(line or row number, row)`` for each row of the table.

        Raises:
            DataError: the table is missing, of an unknown kind, or a JSON line does not parse.
        """
        if not self.table.is_file():
            raise DataError(f"{self.table}: caption table does not exist")
        suffix = self.table.suffix.lower()
        if suffix == ".parquet":
            yield from self._parquet_rows()
            return
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
                raise DataError(f"{self.table}: unknown table kind {suffix!r}; expected one of {TABLE_SUFFIXES}")

    def _parquet_rows(self) -> Iterator[tuple[int, dict[str, Any]]]:
        """Rows of a Parquet table, ``batch_rows`` at a time (row numbers from 0)."""
        import pyarrow.parquet as pq

        try:
            parquet = pq.ParquetFile(self.table)
        except Exception as error:  # pyarrow raises ArrowInvalid and OSError for bad files
            raise DataError(f"{self.table}: not a readable Parquet file ({error})") from error
        names = parquet.schema_arrow.names
        for column in (self.path_column, self.caption_column, *self.extra_caption_columns):
            if column not in names:
                raise DataError(f"{self.table}: column '{column}' is missing (the table has {names})")
        row_number = 0
        for batch in parquet.iter_batches(batch_size=self.batch_rows):
            for row in batch.to_pylist():
                yield row_number, row
                row_number += 1

    def _image_bytes(self, value: Any, where: str) -> tuple[bytes, str, str]:
        """``(image bytes, origin, source path)`` of a path column's value.

        Raises:
            DataError: the file does not exist, or the value is a URL (download it first).
        """
        if isinstance(value, dict) and value.get("bytes") is not None:
            return bytes(value["bytes"]), where, str(value.get("path") or "")
        if isinstance(value, (bytes, bytearray)):
            return bytes(value), where, ""
        text = str(value.get("path") if isinstance(value, dict) else value)
        if "://" in text:
            raise DataError(
                f"{where}: key '{self.path_column}' is a URL ({text}); lf-shards reads local files: "
                "download with img2dataset, then use source=img2dataset"
            )
        image_path = Path(text)
        if not image_path.is_absolute():
            image_path = self.table.parent / image_path
        if not image_path.is_file():
            raise DataError(f"{where}: image file {image_path} does not exist")
        return image_path.read_bytes(), f"{where} ({image_path})", text

    def __iter__(self) -> Iterator[SourceItem]:
        count = 0
        row_word = "row " if self.table.suffix.lower() == ".parquet" else ""
        for line_number, row in self.rows():
            where = f"{self.table}:{row_word}{line_number}"
            for column in (self.path_column, self.caption_column, *self.extra_caption_columns):
                if column not in row or (row[column] is None and column not in self.extra_caption_columns):
                    raise DataError(f"{where}: key '{column}' is missing (row has {sorted(row)})")
            image_bytes, origin, source_path = self._image_bytes(row[self.path_column], where)
            extra = {
                k: _json_safe(v)
                for k, v in row.items()
                if k not in (self.path_column, self.caption_column) and not isinstance(v, (bytes, bytearray))
            }
            caption = str(row[self.caption_column]).strip()
            if self.extra_caption_columns:
                others = [str(row[c]).strip() for c in self.extra_caption_columns if row[c] is not None]
                extra[CAPTIONS_META_KEY] = [caption, *(c for c in others if c)]
            count += 1
            yield SourceItem(
                origin=origin,
                image_bytes=image_bytes,
                caption=caption,
                meta={"source_path": source_path, **extra},
            )
        if count == 0:
            raise DataError(f"{self.table}: the table has no rows")
