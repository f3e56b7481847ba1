"""A tiny LightningModule and a bare CPU Trainer, for tests of callbacks."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch


class TinyLinear(L.LightningModule):
    """One ``Linear(3, 2)`` trained by SGD to map its inputs to zero."""

    def __init__(self, lr: float = 0.1) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(3, 2)
        self.lr = lr

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        return self.layer(batch).pow(2).mean()  # batch: (B, 3)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def bare_trainer(**kwargs: Any) -> L.Trainer:
    """A CPU ``Trainer`` with no logger, checkpointing or model summary; ``kwargs`` add to or override these."""
    options: dict[str, Any] = {
        "accelerator": "cpu",
        "logger": False,
        "enable_checkpointing": False,
        "enable_model_summary": False,
    }
    return L.Trainer(**{**options, **kwargs})
