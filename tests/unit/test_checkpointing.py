"""Which checkpoint ``ckpt_path=last`` takes when ``last.ckpt`` is one save behind, and a damaged checkpoint URL;
retention keeps the checkpoint a run resumed from, on local disk and in a bucket (where the downloaded copy is
removed, also when the run was already finished); ``auto_resume`` passes over a folder upload cut short; a
shared staging folder keeps what is not a checkpoint; a local folder and a bucket resolve by the same rules."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Checkpoint
from omegaconf import OmegaConf
from torch.utils.data import DataLoader

from lf_common import object_store
from lf_common.errors import DataError
from tests.conftest import compose_config, tiny_train_overrides
from tests.unit.tiny_lightning import TinyLinear, bare_trainer
from trainer.callbacks.checkpoint import AtomicModelCheckpoint
from trainer.callbacks.preemption import Preemption
from trainer.callbacks.resumed_from_bucket import ResumedFromBucket
from trainer.checkpoint.resume import (
    checkpoints_newest_first,
    choose_checkpoint,
    resolve_resume_checkpoint,
    resume_checkpoint,
)
from trainer.cli.fit_run import resume_from_config
from trainer.cli.hydra_app import build_trainer


def write_checkpoints(folder: Path, written: dict[str, int]) -> None:
    """Complete checkpoint files (``torch.save`` archives) with the given modification times (s)."""
    for name, seconds in written.items():
        torch.save({"global_step": 0}, folder / name)
        os.utime(folder / name, ns=(seconds * 10**9, seconds * 10**9))


@pytest.mark.parametrize(
    ("written", "newest_first"),
    [
        # the usual order: last.ckpt rewritten right after each step's checkpoint
        ({"step-0000002.ckpt": 10, "step-0000004.ckpt": 20, "last.ckpt": 21}, ["last", "step-0000004", "step-0000002"]),
        # the run died after writing step 4 and before rewriting last.ckpt (still at step 2)
        ({"step-0000002.ckpt": 10, "last.ckpt": 11, "step-0000004.ckpt": 20}, ["step-0000004", "last", "step-0000002"]),
    ],
)
def test_last_takes_the_checkpoint_written_last(tmp_path, written, newest_first):
    write_checkpoints(tmp_path, written)
    assert [p.stem for p in checkpoints_newest_first(tmp_path)] == newest_first
    assert Path(resolve_resume_checkpoint("last", tmp_path)).stem == newest_first[0]


def test_trainer_flag_turns_off_every_checkpoint_callback(tmp_path):
    """``trainer.enable_checkpointing=false`` is the one switch: Lightning refuses any ``Checkpoint``
    callback with it, and preemption's callback (which writes a checkpoint) is one."""
    overrides = tiny_train_overrides(tmp_path / "latents", tmp_path / "run")
    kept = build_trainer(compose_config("train", overrides))
    dropped = build_trainer(compose_config("train", [*overrides, "trainer.enable_checkpointing=false"]))
    assert {type(c) for c in kept.callbacks} >= {AtomicModelCheckpoint, Preemption}
    assert not [c for c in dropped.callbacks if isinstance(c, Checkpoint)], dropped.callbacks
    assert dropped.checkpoint_callback is None


def test_retention_keeps_the_checkpoint_the_run_resumed_from_also_in_a_bucket(s3_bucket, tmp_path):
    """With ``save_top_k=1`` the save at step 4 drops step 2 from the top k. Lightning never deletes the
    checkpoint a run resumed from (it compares with ``trainer.ckpt_path``), but only on local disk; a run
    resumed from a bucket gives Lightning the downloaded copy, and the remote step 2 is kept the same way
    (:class:`ResumedFromBucket`), which also removes the copy and its cache entry once it is loaded."""

    def fit(dirpath: str, steps: int, ckpt_path: str | None = None, resumed_url: str | None = None) -> None:
        callback = AtomicModelCheckpoint(
            dirpath=dirpath,
            filename="step-{step:07d}",
            auto_insert_metric_name=False,
            every_n_train_steps=2,
            monitor="step",
            mode="max",
            save_top_k=1,
            staging_dir=str(tmp_path / "staging"),
        )
        resumed = [ResumedFromBucket(resumed_url, str(ckpt_path))] if resumed_url else []
        trainer = bare_trainer(max_steps=steps, enable_checkpointing=True, callbacks=[callback, *resumed])
        trainer.fit(TinyLinear(), DataLoader(torch.randn(16, 3), batch_size=2), ckpt_path=ckpt_path)

    local = tmp_path / "local"
    fit(str(local), 2)
    fit(str(local), 4, ckpt_path=str(local / "step-0000002.ckpt"))
    assert sorted(p.name for p in local.iterdir()) == ["step-0000002.ckpt", "step-0000004.ckpt"]

    remote = f"{s3_bucket}/checkpoints"
    fit(remote, 2)
    url, copy = choose_checkpoint(f"{remote}/step-0000002.ckpt", None, tmp_path / "cache")
    assert url == f"{remote}/step-0000002.ckpt" and torch.load(copy, weights_only=True)["global_step"] == 2
    fit(remote, 4, ckpt_path=copy, resumed_url=url)
    assert list((tmp_path / "cache").iterdir()) == [], "the copy, its version folder and lock are removed"
    kept = {object_store.basename(entry["url"]) for entry in object_store.list_entries(remote)}
    assert kept == {"step-0000002.ckpt", "step-0000004.ckpt"}


def test_a_finished_run_resumed_from_a_bucket_removes_its_copy(s3_bucket, tmp_path):
    """The same command run again after the run finished (``auto_resume=true`` on a requeue) resumes from the
    checkpoint at ``max_steps``: no training starts, and the downloaded copy is removed all the same."""
    remote = f"{s3_bucket}/checkpoints"

    def fit(steps: int, ckpt_path: str | None = None, resumed_url: str | None = None) -> None:
        callback = AtomicModelCheckpoint(dirpath=remote, every_n_train_steps=2, staging_dir=str(tmp_path / "staging"))
        resumed = [ResumedFromBucket(resumed_url, str(ckpt_path))] if resumed_url else []
        trainer = bare_trainer(max_steps=steps, enable_checkpointing=True, callbacks=[callback, *resumed])
        trainer.fit(TinyLinear(), DataLoader(torch.randn(16, 3), batch_size=2), ckpt_path=ckpt_path)

    fit(2)
    url, copy = choose_checkpoint("last", remote, tmp_path / "cache")
    fit(2, ckpt_path=copy, resumed_url=url)
    assert list((tmp_path / "cache").iterdir()) == [], "the copy, its version folder and lock are removed"


def test_a_damaged_checkpoint_url_falls_back_to_the_one_before(s3_bucket, tmp_path):
    """``ckpt_path=s3://.../step-0000004.ckpt`` damaged: the newest complete one before it, as on local disk (a
    listing of a file's key gives the file itself, which is no folder of checkpoints)."""
    complete, damaged = tmp_path / "complete.ckpt", tmp_path / "damaged.ckpt"
    torch.save({"global_step": 2}, complete)
    damaged.write_bytes(complete.read_bytes()[:50])
    object_store.upload(complete, f"{s3_bucket}/run/step-0000002.ckpt")
    object_store.upload(damaged, f"{s3_bucket}/run/step-0000004.ckpt")
    url, copy = choose_checkpoint(f"{s3_bucket}/run/step-0000004.ckpt", None, tmp_path / "cache")
    assert url == f"{s3_bucket}/run/step-0000002.ckpt"
    assert torch.load(copy, weights_only=True)["global_step"] == 2


def test_auto_resume_starts_afresh_after_the_first_folder_upload_was_cut_short(s3_bucket, tmp_path):
    """A DeepSpeed folder without its ``latest`` tag (its upload cut short, e.g. by the forced exit after a
    preemption) is nothing to resume, as a local ``.partial`` is not: ``auto_resume`` starts at step 0 instead
    of failing on every requeue; once a folder has its tag, ``auto_resume`` resumes."""
    remote = f"{s3_bucket}/run/checkpoints"
    object_store.write_bytes(f"{remote}/step-0000002.ckpt/checkpoint/mp_rank_00_model_states.pt", b"cut short")
    cfg = OmegaConf.create(
        {"callbacks": {"model_checkpoint": {"dirpath": remote}}, "ckpt_path": None, "auto_resume": True}
    )
    cfg.output_dir = str(tmp_path / "run")
    assert resume_from_config(cfg) == (None, None)
    object_store.write_bytes(f"{remote}/step-0000002.ckpt/latest", b"checkpoint")
    with pytest.raises(DataError, match=r"step-0000002\.ckpt \(checkpoint/mp_rank_00_model_states\.pt: not a complete"):
        resume_from_config(cfg)  # tagged: taken, and explained as damaged


def test_a_shared_staging_dir_loses_only_the_checkpoints_a_crash_left(s3_bucket, tmp_path):
    """``staging_dir=/tmp`` (or another folder not ours): a save clears what a crash left there, checkpoints, and
    nothing else."""
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    (scratch / "another-job.bin").write_bytes(b"not ours")
    (scratch / "step-0000001.ckpt").mkdir()  # a staged folder a crash left
    callback = AtomicModelCheckpoint(
        dirpath=f"{s3_bucket}/checkpoints", every_n_train_steps=2, staging_dir=str(scratch)
    )
    trainer = bare_trainer(max_steps=2, enable_checkpointing=True, callbacks=[callback])
    trainer.fit(TinyLinear(), DataLoader(torch.randn(16, 3), batch_size=2))
    assert sorted(p.name for p in scratch.iterdir()) == ["another-job.bin"]


@pytest.mark.parametrize("where", ["local", "bucket"])
def test_one_resolution_for_a_local_folder_and_a_bucket(where, request, tmp_path, caplog):
    """The same checkpoints in a local folder or under a prefix resolve alike: ``auto_resume`` starts afresh
    without checkpoints (a ``.partial`` write is none), then takes ``last`` and passes over the damaged
    ``last.ckpt`` for the newest complete step, downloading only from a bucket."""
    staged = tmp_path / "staged"
    staged.mkdir()
    folder = str(tmp_path / "checkpoints") if where == "local" else f"{request.getfixturevalue('s3_bucket')}/run"

    def put(name: str) -> None:
        target = object_store.join(folder, name)
        if where == "local":
            os.makedirs(folder, exist_ok=True)
            os.replace(staged / name, target)
        else:
            object_store.upload(staged / name, target)

    cache = tmp_path / "cache"
    assert resume_checkpoint(None, folder, True, cache) == (None, None), "no folder yet: a fresh run"
    (staged / "step-0000002.ckpt.partial").write_bytes(b"cut short")
    put("step-0000002.ckpt.partial")
    assert resume_checkpoint(None, folder, True, cache) == (None, None), "a partial write is no checkpoint"
    for step in (2, 4):
        torch.save({"global_step": step}, staged / f"step-{step:07d}.ckpt")
        put(f"step-{step:07d}.ckpt")
    (staged / "last.ckpt").write_bytes(b"damaged")
    put("last.ckpt")
    with caplog.at_level(logging.WARNING, logger="trainer.checkpoint.resume"):
        local, url = resume_checkpoint(None, folder, True, cache)
    assert "passed over last.ckpt (" in caplog.text
    assert torch.load(local, weights_only=True)["global_step"] == 4
    if where == "local":
        assert (local, url) == (object_store.join(folder, "step-0000004.ckpt"), None)
        assert not cache.exists(), "nothing is downloaded from local disk"
    else:
        assert url == f"{folder}/step-0000004.ckpt" and Path(local).is_relative_to(cache)
    assert resume_checkpoint(None, folder, False, cache) == (None, None), "no ckpt_path, no auto_resume: afresh"
