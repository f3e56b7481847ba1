"""A training progress bar that counts optimizer steps to ``max_steps``, with rate and ETA.

Lightning's ``TQDMProgressBar`` counts the batches of one epoch. Latent shards are streamed (an
iterable dataset with no length), so that count has no total: the bar shows neither a percentage
nor an ETA, and it restarts at every epoch. A run is bounded by ``trainer.max_steps`` instead, so
this bar spans the whole run: its total is ``max_steps``, it advances with each optimizer step
(one per ``accumulate_grad_batches`` batches, as ``trainer.global_step`` does) and, after a
resume, starts at the restored global step, so its rate and ETA count only the steps of this run.

Like every Lightning progress bar it shows on rank 0 only (``ProgressBar.setup`` disables it on
the other ranks). With ``max_steps: -1`` (a run bounded by epochs) it is Lightning's epoch bar.
"""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar


class StepProgressBar(TQDMProgressBar):
    """``TQDMProgressBar`` whose training bar runs from the global step to ``trainer.max_steps``.

    Takes ``TQDMProgressBar``'s arguments; ``refresh_rate`` counts optimizer steps (0 hides the
    bar), and ``leave`` (a bar per epoch) applies only to the epoch bar of a run without ``max_steps``.
    """

    @staticmethod
    def counts_steps(trainer: L.Trainer) -> bool:
        """Whether the run has a step bound (else the bar counts the batches of each epoch)."""
        return trainer.max_steps > 0

    def refreshes_at(self, step: int, total: int) -> bool:
        """Whether the bar redraws at ``step``: every ``refresh_rate`` steps and at the last one."""
        return self.is_enabled and (step % self.refresh_rate == 0 or step == total)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        if self.counts_steps(trainer):
            bar = self.train_progress_bar
            bar.reset(total=trainer.max_steps)
            bar.initial = bar.n = trainer.global_step  # rate and ETA count this run's steps only
            bar.unit = "step"
            bar.refresh()

    def on_train_epoch_start(self, trainer: L.Trainer, *args: Any) -> None:
        if not self.counts_steps(trainer):
            super().on_train_epoch_start(trainer, *args)
            return
        self.train_progress_bar.set_description(f"Epoch {trainer.current_epoch}")

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self.counts_steps(trainer):
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
            return
        bar, step = self.train_progress_bar, trainer.global_step
        if step != bar.n and self.refreshes_at(step, bar.total):  # a batch that completed an optimizer step
            if not bar.disable:
                bar.n = step
                bar.refresh()
            bar.set_postfix(self.get_metrics(trainer, pl_module))

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.counts_steps(trainer):
            super().on_train_epoch_end(trainer, pl_module)
            return
        if not self.train_progress_bar.disable:
            self.train_progress_bar.set_postfix(self.get_metrics(trainer, pl_module))
