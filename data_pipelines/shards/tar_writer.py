"""Write WebDataset tar shards with a fixed number of samples each, atomically."""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import webdataset as wds

from lf_common import object_store
from lf_common.atomic import TMP_SUFFIX
from lf_common.errors import ConfigError, DataError

SHARD_SUFFIX = ".tar"
# A fixed, whole-second member time: identical input gives byte-identical shards (stable content
# hashes), and tarfile writes no per-member PAX header, which would double the headers a reader parses.
SHARD_MTIME = 946684800  # 2000-01-01T00:00:00Z


def open_tar_writer(path: str | Path) -> wds.TarWriter:
    """A ``webdataset.TarWriter`` for members given as bytes, with :data:`SHARD_MTIME`."""
    return wds.TarWriter(str(path), encoder=False, mtime=SHARD_MTIME)


@dataclass
class WrittenShard:
    """One complete shard on disk (a ``Path``) or in an object store (its URL)."""

    path: Path | str
    num_samples: int
    num_bytes: int


class AtomicShardWriter:
    """Write samples to ``{prefix}-{index:06d}.tar`` shards of ``samples_per_shard`` samples.

    Each shard is written under ``*.tar.tmp`` and renamed when complete, so a crash leaves no
    partial shard under a ``.tar`` name. Use as a context manager; :attr:`shards` lists what was
    written. With an object-store ``out_dir`` (``s3://bucket/raw``) each shard is written to a local
    temporary file, uploaded whole when complete (the object appears only then), and removed locally.

    Args:
        out_dir: the output folder (created), or an object-store URL prefix.
        samples_per_shard: samples per shard (the last one may hold fewer).
        max_bytes_per_shard: also start a new shard once a shard holds this many bytes (``None``: no limit).
        prefix: shard file name prefix.
        overwrite: remove existing ``.tar`` shards in ``out_dir`` first; without it, a folder that
            already holds shards is refused, so old and new shards never mix.
    """

    def __init__(
        self,
        out_dir: str | Path,
        samples_per_shard: int,
        prefix: str = "shard",
        overwrite: bool = False,
        max_bytes_per_shard: int | None = None,
    ):
        if samples_per_shard < 1:
            raise ConfigError(f"samples_per_shard={samples_per_shard}: expected at least 1")
        self.remote = object_store.is_store(out_dir)  # no rename there: each shard written locally, then uploaded
        self.out_url = str(out_dir).rstrip("/")
        self.out_dir = Path(tempfile.mkdtemp(prefix="lf-shards-")) if self.remote else Path(out_dir)
        self.samples_per_shard = samples_per_shard
        self.max_bytes_per_shard = max_bytes_per_shard
        self._bytes = 0
        self.prefix = prefix
        self.shards: list[WrittenShard] = []
        self._writer: wds.TarWriter | None = None
        self._count = 0
        self.out_dir.mkdir(parents=True, exist_ok=True)
        existing: list[Any] = sorted(self.out_dir.glob(f"*{SHARD_SUFFIX}")) + sorted(
            self.out_dir.glob(f"*{SHARD_SUFFIX}{TMP_SUFFIX}")
        )
        if self.remote:
            existing = self._remote_shards()
        if existing and not overwrite:
            where = self.out_url if self.remote else self.out_dir
            raise DataError(
                f"{where}: already holds {len(existing)} shard(s) such as {object_store.basename(str(existing[0]))}; "
                "choose another out_dir or set overwrite=true"
            )
        for path in existing:
            if self.remote:
                fs, key = object_store.filesystem(path)
                fs.rm_file(key)
            else:
                path.unlink()

    def _remote_shards(self) -> list[str]:
        """The ``.tar`` objects under the output prefix (none when the prefix is empty)."""
        try:
            return object_store.list_objects(self.out_url + "/", SHARD_SUFFIX)
        except object_store.ObjectStoreError:
            protocol, path = self.out_url.split("://", 1)
            if object_store.exists(f"{protocol}://{path.split('/')[0]}"):
                return []  # the bucket exists; the prefix holds nothing yet
            raise

    def shard_path(self, index: int) -> Path:
        """The final local path of shard ``index`` (with an object-store ``out_dir``: where it waits for upload)."""
        return self.out_dir / f"{self.prefix}-{index:06d}{SHARD_SUFFIX}"

    def write(self, sample: dict[str, Any]) -> None:
        """Add one sample (``__key__`` plus members as bytes)."""
        if self._writer is None:
            self._open()
        assert self._writer is not None
        self._writer.write(sample)
        self._count += 1
        # Each tar member takes a 512-byte header and its data padded to whole 512-byte blocks.
        self._bytes += sum(512 + -(-len(v) // 512) * 512 for k, v in sample.items() if not k.startswith("__"))
        full = self.max_bytes_per_shard is not None and self._bytes >= self.max_bytes_per_shard
        if self._count >= self.samples_per_shard or full:
            self._close_shard()

    def _tmp_path(self) -> Path:
        final = self.shard_path(len(self.shards))
        return final.with_name(final.name + TMP_SUFFIX)

    def _open(self) -> None:
        self._writer = open_tar_writer(self._tmp_path())
        self._count = 0
        self._bytes = 0

    def _close_shard(self) -> None:
        assert self._writer is not None
        self._writer.close()
        final = self.shard_path(len(self.shards))
        os.replace(self._tmp_path(), final)
        size = final.stat().st_size
        if self.remote:
            url = object_store.join(self.out_url, final.name)
            try:
                object_store.upload(final, url)
            finally:
                final.unlink(missing_ok=True)
            self.shards.append(WrittenShard(url, self._count, size))
        else:
            self.shards.append(WrittenShard(final, self._count, size))
        self._writer = None

    def close(self) -> list[WrittenShard]:
        """Finish the last shard and return every shard written."""
        if self._writer is not None and self._count:
            self._close_shard()
        return self.shards

    def abort(self) -> None:
        """Drop the shard being written (its temporary file is removed)."""
        if self._writer is not None:
            self._writer.close()
            self._tmp_path().unlink(missing_ok=True)
            self._writer = None
        self._remove_staging()

    def _remove_staging(self) -> None:
        if self.remote:
            shutil.rmtree(self.out_dir, ignore_errors=True)

    def __enter__(self) -> AtomicShardWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc is None:
            try:
                self.close()
            finally:
                self._remove_staging()
        else:
            self.abort()
