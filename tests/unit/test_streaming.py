import io
import logging
import os
import signal

import pytest
import torch
from PIL import Image
from torch.utils.data import IterableDataset

from data_pipelines.loading.datamodules import ImageShardDataModule
from data_pipelines.shards.corrupt_samples import COUNTS_KEY, SkipCounter, TooManyCorruptSamples
from data_pipelines.shards.resumable_loader import LoaderWorkerDied, ResumableLoader
from data_pipelines.shards.tar_writer import open_tar_writer


def write_shard(path, good: int, bad: int):
    with open_tar_writer(path) as writer:
        for i in range(good + bad):
            buffer = io.BytesIO()
            Image.new("RGB", (8, 8), (i * 20 % 255, 0, 0)).save(buffer, format="PNG")
            image = buffer.getvalue() if i >= bad else b"\x89PNG broken"
            writer.write({"__key__": f"{i:09d}", "png": image, "txt": b"caption"})


def test_corrupt_samples_are_skipped_counted_and_logged(tmp_path, caplog):
    write_shard(tmp_path / "s.tar", good=6, bad=2)
    datamodule = ImageShardDataModule(
        str(tmp_path), resolution=8, batch_size=2, num_workers=0, shuffle_buffer=0, resampled=False
    )
    with caplog.at_level(logging.WARNING):
        batches = list(datamodule.train_dataloader())
    assert sum(b["pixels"].shape[0] for b in batches) == 6
    assert batches[0]["pixels"].shape == (2, 3, 8, 8)
    assert "s.tar: sample 000000000: image 'png' does not decode" in caplog.text
    assert "skipped corrupt sample 2 (of 2 read)" in caplog.text
    for batch in batches:  # what Lightning does with each batch before the step
        datamodule.on_before_batch_transfer(batch, 0)
        assert COUNTS_KEY not in batch
    assert (datamodule.sample_counts.seen, datamodule.sample_counts.skipped) == (8, 2)


def test_too_many_corrupt_samples_fail_the_run(tmp_path):
    write_shard(tmp_path / "s.tar", good=2, bad=3)
    datamodule = ImageShardDataModule(
        str(tmp_path),
        resolution=8,
        batch_size=2,
        num_workers=0,
        shuffle_buffer=0,
        resampled=False,
        bad_fraction_min_samples=4,
    )
    with pytest.raises(TooManyCorruptSamples, match=r"1 of 1 samples read .* more than max_bad_fraction=0.01 .*s\.tar"):
        list(datamodule.train_dataloader())


def test_bad_fraction_limit_counts_good_samples():
    counter = SkipCounter(max_bad_fraction=0.25, min_samples=4)
    counter(ValueError("a.tar: sample 1"))  # 1 bad of at least 4: within 25%
    for _ in range(6):
        counter.count_good()
    counter(ValueError("a.tar: sample 8"))  # 2 of 8
    with pytest.raises(TooManyCorruptSamples, match=r"3 of 9 samples read are corrupt.*last: b\.tar: sample 9"):
        counter(ValueError("b.tar: sample 9"))


def test_resampled_stream_gives_equal_epochs(tmp_path):
    write_shard(tmp_path / "a.tar", good=10, bad=0)
    write_shard(tmp_path / "b.tar", good=3, bad=0)
    datamodule = ImageShardDataModule(str(tmp_path), resolution=8, batch_size=4, num_workers=0, shuffle_buffer=4)
    assert datamodule.num_samples == 13
    loader = datamodule.train_dataloader()
    assert [len(list(loader)) for _ in range(3)] == [4, 4, 4]


def test_worker_processes_share_out_the_epoch(tmp_path):
    for name in ("a", "b"):
        write_shard(tmp_path / f"{name}.tar", good=12, bad=0)
    datamodule = ImageShardDataModule(str(tmp_path), resolution=8, batch_size=4, num_workers=2, shuffle_buffer=4)
    loader = datamodule.train_dataloader()
    assert [len(list(loader)) for _ in range(2)] == [6, 6]  # 24 samples / batch 4, split over 2 workers
    once = ImageShardDataModule(str(tmp_path), resolution=8, batch_size=4, num_workers=2, resampled=False)
    assert sum(b["pixels"].shape[0] for b in once.train_dataloader()) == 24  # each shard read by one worker


def test_too_few_shards_for_the_workers_is_named(tmp_path):
    from lf_common.errors import DataError

    write_shard(tmp_path / "only.tar", good=4, bad=0)
    datamodule = ImageShardDataModule(str(tmp_path), resolution=8, batch_size=2, num_workers=2, resampled=False)
    with pytest.raises(DataError, match=r"1 shard\(s\) for 1 rank\(s\) x 2 loader worker\(s\)"):
        datamodule.train_dataloader()
    datamodule.val_urls = datamodule.urls  # validation caps its workers instead
    assert sum(b["pixels"].shape[0] for b in datamodule.val_dataloader()) == 4


def test_a_shard_that_disappears_is_retried_then_skipped_and_counted(tmp_path, caplog):
    for name in ("a", "b", "c"):
        write_shard(tmp_path / f"{name}.tar", good=4, bad=0)
    datamodule = ImageShardDataModule(
        str(tmp_path), resolution=8, batch_size=2, num_workers=0, shuffle_buffer=0, resampled=False,
        max_bad_fraction=0.5, bad_fraction_min_samples=4, shard_retries=2, shard_retry_delay_s=0.01,
    )  # fmt: skip
    loader = datamodule.train_dataloader()
    (tmp_path / "b.tar").unlink()  # gone after the run listed it
    with caplog.at_level(logging.WARNING):
        batches = list(loader)
    assert sum(b["pixels"].shape[0] for b in batches) == 8, "the other shards' samples all arrive"
    assert caplog.text.count("b.tar: ") >= 2 and "try 2 of 2" in caplog.text, "retried twice"
    assert "skipped unreadable shard" in caplog.text and "b.tar (about 4 samples" in caplog.text
    for batch in batches:
        datamodule.on_before_batch_transfer(batch, 0)
    assert (datamodule.sample_counts.seen, datamodule.sample_counts.skipped) == (12, 4)


def test_an_unreadable_shard_over_the_bad_fraction_fails_naming_it(tmp_path):
    write_shard(tmp_path / "a.tar", good=4, bad=0)
    datamodule = ImageShardDataModule(
        str(tmp_path), resolution=8, batch_size=2, num_workers=0, shuffle_buffer=0, resampled=False,
        bad_fraction_min_samples=4, shard_retries=0,
    )  # fmt: skip
    loader = datamodule.train_dataloader()
    (tmp_path / "a.tar").unlink()
    with pytest.raises(TooManyCorruptSamples, match=r"shard .*a\.tar is unreadable .* restore the shard"):
        list(loader)


class _WorkerPids(IterableDataset):
    def __iter__(self):
        while True:
            yield torch.tensor(os.getpid())


def test_a_killed_loader_worker_gives_an_error_naming_it_and_the_fix():
    loader = ResumableLoader(_WorkerPids(), batch_size=None, num_workers=1)
    batches = iter(loader)
    worker = int(next(batches))
    expected = rf"rank 0: a data-loader worker died \(.*{worker}.*out-of-memory"
    with pytest.raises(LoaderWorkerDied, match=expected) as error:
        os.kill(worker, signal.SIGKILL)  # as the out-of-memory killer does
        for _ in range(1000):  # the batches already prefetched come first
            next(batches)
    assert "lower data.num_workers" in str(error.value) and "auto_resume=true" in str(error.value)
