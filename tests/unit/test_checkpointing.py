"""Which checkpoint ``ckpt_path=last`` takes when ``last.ckpt`` is one save behind."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from trainer.checkpointing import checkpoints_newest_first, resolve_resume_checkpoint


def write_checkpoints(folder: Path, written: dict[str, int]) -> None:
    """Complete checkpoint files (``torch.save`` archives) with the given modification times (s)."""
    for name, seconds in written.items():
        torch.save({"global_step": 0}, folder / name)
        os.utime(folder / name, ns=(seconds * 10**9, seconds * 10**9))


def test_last_is_newest_when_written_after_the_step_checkpoints(tmp_path):
    write_checkpoints(tmp_path, {"step-0000002.ckpt": 10, "step-0000004.ckpt": 20, "last.ckpt": 21})
    assert [p.name for p in checkpoints_newest_first(tmp_path)] == [
        "last.ckpt",
        "step-0000004.ckpt",
        "step-0000002.ckpt",
    ]
    assert Path(resolve_resume_checkpoint("last", tmp_path)).name == "last.ckpt"


def test_a_step_checkpoint_written_after_last_is_taken_first(tmp_path):
    """The run died after writing step 4 and before rewriting last.ckpt (still at step 2)."""
    write_checkpoints(tmp_path, {"step-0000002.ckpt": 10, "last.ckpt": 11, "step-0000004.ckpt": 20})
    assert [p.name for p in checkpoints_newest_first(tmp_path)] == [
        "step-0000004.ckpt",
        "last.ckpt",
        "step-0000002.ckpt",
    ]
    assert Path(resolve_resume_checkpoint("last", tmp_path)).name == "step-0000004.ckpt"
