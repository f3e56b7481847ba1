"""Which checkpoint ``ckpt_path=last`` takes when ``last.ckpt`` is one save behind."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Checkpoint

from tests.conftest import compose_config, tiny_train_overrides
from trainer.callbacks.checkpoint import ModelCheckpoint
from trainer.callbacks.preemption import Preemption
from trainer.checkpoint.resume import checkpoints_newest_first, resolve_resume_checkpoint
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
    assert {type(c) for c in kept.callbacks} >= {ModelCheckpoint, Preemption}
    assert not [c for c in dropped.callbacks if isinstance(c, Checkpoint)], dropped.callbacks
    assert dropped.checkpoint_callback is None
