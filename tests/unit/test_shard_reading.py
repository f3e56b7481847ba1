"""Object-store shards whose connection drops mid-read are reopened at their offset, not cut short."""

from __future__ import annotations

import io
import uuid

import pytest

from data_pipelines.shards.corrupt_samples import SkipCounter
from data_pipelines.shards.shard_reading import ReopeningStream, ShardSamples
from data_pipelines.shards.tar_writer import open_tar_writer
from lf_common import object_store


class DroppingFile(io.BytesIO):
    """An object's bytes whose reads fail once ``fail_at`` bytes were handed out (a dropped connection)."""

    def __init__(self, data: bytes, fail_at: int | None) -> None:
        super().__init__(data)
        self.fail_at = fail_at
        self.sought: list[int] = []

    def seek(self, offset: int, whence: int = 0) -> int:
        self.sought.append(offset)
        return super().seek(offset, whence)

    def read(self, size: int = -1) -> bytes:
        if self.fail_at is not None and self.tell() >= self.fail_at:
            raise ConnectionResetError("connection reset by peer")
        if self.fail_at is not None and (size < 0 or self.tell() + size > self.fail_at):
            size = self.fail_at - self.tell()  # hand out what arrived before the drop
        return super().read(size)


def dropping_opener(data: bytes, fail_at: list[int | None]):
    """Opens ``data``; the n-th open fails at ``fail_at[n]`` (``None``: never), the last entry repeats."""
    opened = []

    def opener(url: str) -> DroppingFile:
        file = DroppingFile(data, fail_at[min(len(opened), len(fail_at) - 1)])
        opened.append(file)
        return file

    return opener, opened


def test_a_dropped_read_is_reopened_at_its_offset_and_gives_the_same_bytes():
    data = bytes(range(256)) * 40
    opener, opened = dropping_opener(data, [1000, 5000, None])
    stream = ReopeningStream("s3://bucket/shard.tar", opener=opener, retries=3, retry_delay_s=0)
    chunks = [stream.read(700) for _ in range(20)]
    assert b"".join(chunks) == data
    assert stream.reopened == 2 and len(opened) == 3
    assert [file.sought for file in opened] == [[], [1000], [5000]]  # each reopened at the byte it had reached


def test_a_store_down_past_every_retry_names_the_url_and_the_offset():
    opener, opened = dropping_opener(b"x" * 100, [40, 0])
    stream = ReopeningStream("s3://bucket/shard.tar", opener=opener, retries=2, retry_delay_s=0)
    assert stream.read(40) == b"x" * 40
    expected = r"s3://bucket/shard\.tar: .*from byte 40 \(after 2 retries\)"
    with pytest.raises(object_store.ObjectStoreError, match=expected):
        stream.read(10)
    assert len(opened) == 3  # the first connection and two reopened ones


def test_every_sample_of_a_shard_whose_connection_drops_is_read(tmp_path, monkeypatch):
    local = tmp_path / "shard.tar"
    with open_tar_writer(local) as writer:
        for i in range(12):
            writer.write({"__key__": f"{i:06d}", "bin": bytes([i]) * 3000, "txt": f"caption {i}".encode()})
    url = f"memory://lf-{uuid.uuid4().hex}/shard.tar"
    object_store.upload(local, url)
    real_open = object_store.open_url
    opens = []

    def dropping_open(name: str, mode: str = "rb"):
        opens.append(name)
        if len(opens) > 1:  # reopened: the store is back
            return real_open(name, mode)
        return DroppingFile(real_open(name, mode).read(), fail_at=local.stat().st_size // 2)

    monkeypatch.setattr(object_store, "open_url", dropping_open)
    counter = SkipCounter(max_bad_fraction=0.0, min_samples=1)
    samples = list(ShardSamples(counter, retries=2, retry_delay_s=0)([{"url": url}]))
    assert [s["__key__"] for s in samples] == [f"{i:06d}" for i in range(12)]
    assert [s["bin"] for s in samples] == [bytes([i]) * 3000 for i in range(12)]
    assert counter.skipped == 0 and len(opens) == 2
