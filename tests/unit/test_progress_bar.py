"""The step progress bar: total ``max_steps``, one tick per optimizer step, starting at the resumed
step; rank 0 only; configured for ``lf-train`` and switched off by ``trainer.enable_progress_bar``."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import lightning as L
import torch

from tests.conftest import compose_config, tiny_train_overrides
from tests.unit.tiny_lightning import TinyLinear, bare_trainer
from trainer.callbacks.progress import StepProgressBar
from trainer.cli.hydra_app import build_trainer

ACCUMULATE = 2


class Streamed(torch.utils.data.IterableDataset):
    """Eight samples with no length, as streamed shards are: Lightning cannot count an epoch's batches."""

    def __iter__(self):
        generator = torch.Generator().manual_seed(0)
        return iter([torch.randn(3, generator=generator) for _ in range(8)])


class BarPosition(L.Callback):
    """The train bar's count after every batch (runs after the bar, which Lightning keeps in list order)."""

    def __init__(self, bar: StepProgressBar) -> None:
        self.bar, self.counts = bar, []

    def on_train_batch_end(self, *args) -> None:
        self.counts.append(self.bar.train_progress_bar.n)


def fit(bar: StepProgressBar, max_steps: int, root: Path, ckpt_path: Path | None = None) -> BarPosition:
    """Train ``TinyLinear`` on 4 batches an epoch, accumulating 2; save ``root/last.ckpt``."""
    position = BarPosition(bar)
    trainer = bare_trainer(
        max_steps=max_steps, accumulate_grad_batches=ACCUMULATE, default_root_dir=root, callbacks=[bar, position]
    )
    loader = torch.utils.data.DataLoader(Streamed(), batch_size=2)
    trainer.fit(TinyLinear(), loader, ckpt_path=ckpt_path, weights_only=True)
    trainer.save_checkpoint(root / "last.ckpt")
    return position


def test_bar_counts_optimizer_steps_to_max_steps_across_epochs(tmp_path):
    bar = StepProgressBar()
    position = fit(bar, 4, tmp_path)  # 8 batches: two epochs
    assert (bar.train_progress_bar.total, bar.train_progress_bar.initial) == (4, 0)
    assert position.counts == [0, 1, 1, 2, 2, 3, 3, 4], "one tick per optimizer step, not per batch"
    assert bar.train_progress_bar.n == 4


def test_bar_starts_at_the_resumed_step(tmp_path):
    fit(StepProgressBar(), 2, tmp_path)
    bar = StepProgressBar()
    position = fit(bar, 5, tmp_path, ckpt_path=tmp_path / "last.ckpt")
    assert (bar.train_progress_bar.total, bar.train_progress_bar.initial) == (5, 2), "rate and ETA count 3 steps"
    assert position.counts == [2, 3, 3, 4, 4, 5]
    assert bar.train_progress_bar.n == 5


def test_bar_shows_on_rank_zero_only():
    shown, hidden = StepProgressBar(), StepProgressBar()
    shown.setup(SimpleNamespace(is_global_zero=True), None, "fit")
    hidden.setup(SimpleNamespace(is_global_zero=False), None, "fit")
    assert shown.is_enabled and hidden.is_disabled


def test_lf_train_config_has_the_bar_and_the_trainer_flag_turns_it_off(tmp_path):
    overrides = tiny_train_overrides(tmp_path / "latents", tmp_path / "run")
    shown = build_trainer(compose_config("train", [*overrides, "trainer.enable_progress_bar=true"]))
    hidden = build_trainer(compose_config("train", overrides))  # the overrides turn the bar off
    assert isinstance(shown.progress_bar_callback, StepProgressBar)
    assert hidden.progress_bar_callback is None
