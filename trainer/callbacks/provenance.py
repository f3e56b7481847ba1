"""Store the run's resolved config and data manifest in every checkpoint, so export needs nothing else."""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback

from trainer.checkpoint.keys import CHECKPOINT_KEY


class Provenance(Callback):
    """Adds ``checkpoint["latentforge"]["train_config"]`` and ``["latent_manifest"]``.

    The manifest is the training data's (``trainer.datamodule.manifest``: it names the VAE, text
    encoder and tokenizer that export packs with the UNet), read once the data module is set up.

    Args:
        train_config: the resolved training config (plain containers).
    """

    def __init__(self, train_config: dict[str, Any]) -> None:
        self.train_config = train_config
        self.latent_manifest: dict[str, Any] = {}

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.latent_manifest = trainer.datamodule.manifest.to_dict()

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        record = checkpoint.setdefault(CHECKPOINT_KEY, {})
        record["train_config"] = self.train_config
        record["latent_manifest"] = self.latent_manifest
        record["global_step"] = trainer.global_step
