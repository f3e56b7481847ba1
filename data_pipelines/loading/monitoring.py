"""Log the loader's corrupt-sample counts as training metrics."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch

from data_pipelines.shards.corrupt_samples import SampleCounts


class SkippedSamplesMonitor(L.Callback):
    """Logs ``data/skipped_samples`` (corrupt samples skipped so far, all ranks added up) and
    ``data/bad_fraction`` (of the samples read so far) every training step.

    Args:
        counts: the counts a streaming data module keeps (``datamodule.sample_counts``), which it
            updates from every batch its loader workers send.
    """

    def __init__(self, counts: SampleCounts) -> None:
        self.counts = counts

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        totals = torch.tensor([self.counts.seen, self.counts.skipped], dtype=torch.float32, device=pl_module.device)
        if trainer.world_size > 1:
            totals = trainer.strategy.reduce(totals, reduce_op="sum")  # (2,): seen, skipped over all ranks
        seen, skipped = float(totals[0]), float(totals[1])
        pl_module.log("data/skipped_samples", skipped, on_step=True, on_epoch=False)
        pl_module.log("data/bad_fraction", skipped / seen if seen else 0.0, on_step=True, on_epoch=False)
