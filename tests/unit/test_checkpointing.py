"""Which checkpoint ``ckpt_path=last`` takes when ``last.ckpt`` is one save behind."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from trainer.checkpoint.resume import checkpoints_newest_first, resolve_resume_checkpoint


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
