"""Opening shards for reading: local paths, ``pipe:``/``http(s)://`` through webdataset, object-store
URLs through fsspec, with retries.

A shard that cannot be opened (it disappeared, the file system is failing) is tried again
``shard_retries`` times, waiting longer each time; then it is skipped and counted as about as many
bad samples as a shard holds, within the same ``max_bad_fraction`` (:class:`ShardSamples`).

An object-store shard whose connection drops while it is read (a store that throttles, a network that
blips past the client's own retries) is opened again at the byte it had reached, with the same
retries and backoff (:class:`ReopeningStream`), so its remaining samples are read, not counted as
corrupt; only a store down past every retry ends the shard, through the skip counter.
"""

from __future__ import annotations

import functools
import logging
import tarfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO, Any

import webdataset as wds
from webdataset.gopen import gopen
from webdataset.tariterators import group_by_keys, tar_file_expander

from data_pipelines.shards.corrupt_samples import SkipCounter
from lf_common import object_store

log = logging.getLogger(__name__)


class ShardSamples:
    """A pipeline stage: shard urls -> samples, opening each shard with retries (a picklable wrapper).

    A shard that cannot be opened is tried ``retries`` more times, ``retry_delay_s`` apart and twice
    that each further time (a file system that hiccups); then it is skipped through
    :meth:`SkipCounter.skip_shard` as ``samples_per_shard`` bad samples. Errors inside a shard
    (a truncated member, a bad sample) go to the handler as before.

    Args:
        handler: the skip counter.
        samples_per_shard: what an unreadable shard counts as.
        retries: further tries of a shard that cannot be opened.
        retry_delay_s: the wait before the first retry (doubling after).
    """

    def __init__(
        self, handler: SkipCounter, samples_per_shard: int = 1, retries: int = 3, retry_delay_s: float = 1.0
    ) -> None:
        self.handler = handler
        self.samples_per_shard = max(1, samples_per_shard)
        self.retries = retries
        self.retry_delay_s = retry_delay_s

    def __call__(self, shards: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        streams = (opened for shard in shards if (opened := self.open(shard)) is not None)
        files = tar_file_expander(streams, handler=self.handler)
        return group_by_keys(files, handler=self.handler)

    def open(self, shard: dict[str, Any]) -> dict[str, Any] | None:
        """``shard`` with its opened ``stream``, or ``None`` when it stayed unreadable (skipped and counted)."""
        url = shard["url"]
        for attempt in range(self.retries + 1):
            try:
                return {**shard, "stream": open_shard(url, self.retries, self.retry_delay_s)}
            except (OSError, object_store.ObjectStoreError) as error:
                if attempt == self.retries:
                    self.handler.skip_shard(url, error, self.samples_per_shard)
                    return None
                delay = self.retry_delay_s * 2**attempt
                log.warning("shard %s: %s; try %d of %d in %.1f s", url, error, attempt + 1, self.retries, delay)
                time.sleep(delay)
        return None


def open_shard(url: str, retries: int = 3, retry_delay_s: float = 1.0) -> Any:
    """A readable stream of shard ``url``: an object-store URL streamed through fsspec (ranged reads) and
    reopened at its offset when its connection drops (:class:`ReopeningStream`), anything else (a local
    path, ``pipe:``, ``http(s)://``) through webdataset's ``gopen``.

    Raises:
        ObjectStoreError: the object cannot be opened (missing, refused, unreachable).
    """
    if object_store.is_store(url):
        return ReopeningStream(url, retries=retries, retry_delay_s=retry_delay_s)
    return gopen(url)


class ReopeningStream:
    """A sequential read-only stream of an object that reopens it at the current offset after a failed read.

    ``tarfile``'s stream mode reads forward only, so a failed read is repeated on a fresh connection
    from the same byte: the bytes handed out are those of one uninterrupted read. A read is tried
    ``retries`` more times, ``retry_delay_s`` apart and twice that each further time; then the last
    error is raised as an :class:`~lf_common.object_store.ObjectStoreError` naming the URL and offset.

    Args:
        url: the object (``s3://bucket/key``).
        opener: opens ``url`` for reading (default :func:`lf_common.object_store.open_url`).
        retries: further tries of a failed read (each on a reopened object).
        retry_delay_s: the wait before the first retry (doubling after).
    """

    def __init__(
        self,
        url: str,
        opener: Callable[[str], IO[bytes]] | None = None,
        retries: int = 3,
        retry_delay_s: float = 1.0,
    ) -> None:
        self.url = url
        self.retries = retries
        self.retry_delay_s = retry_delay_s
        self.reopened = 0  # how many times a dropped connection was reopened
        self._opener = opener or object_store.open_url
        self._offset = 0
        self._file: IO[bytes] | None = self._opener(url)

    def readable(self) -> bool:
        """Always: the stream reads."""
        return True

    def read(self, size: int = -1) -> bytes:
        """Up to ``size`` bytes from the current offset (all the rest for ``-1``).

        Raises:
            ObjectStoreError: every retry failed.
        """
        for attempt in range(self.retries + 1):
            try:
                if self._file is None:
                    self._file = self._opener(self.url)
                    self._file.seek(self._offset)
                    self.reopened += 1
                data = self._file.read(size)
            except (*object_store.STORE_ERRORS, object_store.ObjectStoreError) as error:
                self._drop_connection()
                if attempt == self.retries:
                    raise object_store.storage_error(
                        self.url, error, f"the object readable from byte {self._offset} (after {self.retries} retries)"
                    ) from error
                delay = self.retry_delay_s * 2**attempt
                log.warning(
                    "shard %s: read failed at byte %d (%s); reopening, try %d of %d in %.1f s",
                    self.url,
                    self._offset,
                    error,
                    attempt + 1,
                    self.retries,
                    delay,
                )
                time.sleep(delay)
                continue
            self._offset += len(data)
            return data
        raise AssertionError("unreachable")  # the loop returns or raises

    def _drop_connection(self) -> None:
        if self._file is not None:
            try:
                self._file.close()
            except (*object_store.STORE_ERRORS, object_store.ObjectStoreError):
                pass  # the connection is gone already
            self._file = None

    def close(self) -> None:
        """Close the object."""
        self._drop_connection()

    def __enter__(self) -> ReopeningStream:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def tar_samples(shards: Iterable[dict[str, Any]], handler: Callable[[Exception], bool]) -> Iterator[dict[str, Any]]:
    """A pipeline stage: shard urls -> raw samples, like webdataset's ``tarfile_samples`` but opening
    each shard with :func:`open_shard`; a shard that cannot be opened goes to ``handler``."""

    def streams() -> Iterator[dict[str, Any]]:
        for shard in shards:
            try:
                stream = open_shard(shard["url"])
            except Exception as error:
                if handler(error):
                    continue
                break
            yield {**shard, "stream": stream}

    return group_by_keys(tar_file_expander(streams(), handler=handler), handler=handler)


def raw_samples(shards: Iterable[str]) -> wds.DataPipeline:
    """The samples (``__key__`` and member bytes) of ``shards`` in shard and key order, each shard a local
    path or a URL (streamed, as :func:`open_shard` opens it); any error is raised (a missing object is one
    line naming its URL), none is skipped: for readers that need every sample (a reference set, dedup)."""
    return wds.DataPipeline(
        wds.SimpleShardList(list(shards)), functools.partial(tar_samples, handler=wds.reraise_exception)
    )


def count_samples(urls: list[str]) -> int:
    """Samples in raw shards: the distinct keys of their members (webdataset's key rule); local files or
    object-store URLs, read as streams."""
    total = 0
    for url in urls:
        with open_shard(url) as stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
            total += len({Path(member.name).name.split(".", 1)[0] for member in tar})
    return total
