"""Faults inside one training process that the run survives or reports: non-finite losses (skip mode).

The other faults are tested where their runs are: preemption signals, a full disk and a loader worker
killed mid-run in ``test_resume.py`` (one process) and ``test_distributed.py`` (DDP, ZeRO-2, torchrun
restarts, hangs); vanishing shards and dead loader workers in ``tests/unit/test_streaming.py``; DreamBooth
preparation's meetings in ``tests/unit/test_dreambooth_prepare.py``.
"""

from __future__ import annotations

import pytest
import torch

from tests.conftest import compose_config, tiny_train_overrides
from tests.integration.faults import inject
from trainer.callbacks.finite_loss import NonFiniteLossError
from trainer.checkpoint.reading import load_checkpoint
from trainer.cli.train import run_train

pytestmark = pytest.mark.slow


def test_skip_mode_skips_non_finite_steps_counts_them_and_stops_past_the_maximum(latent_dir, tmp_path):
    """NaN batches in steps 2 and 4, at most 1 skipped: step 2 is skipped (weights stay finite, counted and
    logged), step 4 is one too many."""
    overrides = [
        *tiny_train_overrides(latent_dir, tmp_path, steps=6),
        "callbacks.model_checkpoint.save_top_k=-1",
        "callbacks.finite_loss.on_non_finite=skip",
        "callbacks.finite_loss.max_skipped_steps=1",
        *inject("nan", "NaNBatchAt", steps=[1, 3]),
    ]
    with pytest.raises(NonFiniteLossError, match=r"step 3: 2 optimizer steps skipped, more than .*max_skipped_steps=1"):
        run_train(compose_config("train", overrides))
    state = load_checkpoint(tmp_path / "checkpoints" / "step-0000002.ckpt")
    assert all(torch.isfinite(v).all() for v in state["state_dict"].values()), "the skipped step left no NaN"
    assert state["callbacks"]["FiniteLossGuard"] == {"skipped_steps": 1}
    metrics = (tmp_path / "csv" / "version_0" / "metrics.csv").read_text()
    assert "train/skipped_steps" in metrics.splitlines()[0]
