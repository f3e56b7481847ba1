"""Store the run's resolved config and data manifest in every checkpoint, so export needs nothing else."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback

from data_pipelines.loading.datamodules import LatentShardDataModule
from data_pipelines.loading.mixed import MixedLatentDataModule
from trainer.checkpoint.keys import CHECKPOINT_KEY


class Provenance(Callback):
    """Adds ``checkpoint["latentforge"]["train_config"]``, ``["latent_manifest"]`` and ``["datasets"]``.

    The manifest is the training data's (``trainer.datamodule.manifest``: it names the VAE, text
    encoder and tokenizer that export packs with the UNet), read once the data module is set up; with
    ``data=mixed`` it is the first folder's (every folder agrees on the encoders). ``datasets`` lists every
    latent-shard folder the run draws from (:func:`training_datasets`), so the export names them all.

    Args:
        train_config: the resolved training config (plain containers).
    """

    def __init__(self, train_config: dict[str, Any]) -> None:
        self.train_config = train_config
        self.latent_manifest: dict[str, Any] = {}
        self.datasets: list[dict[str, Any]] = []

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.latent_manifest = trainer.datamodule.manifest.to_dict()
        self.datasets = training_datasets(trainer.datamodule)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        record = checkpoint.setdefault(CHECKPOINT_KEY, {})
        record["train_config"] = self.train_config
        record["latent_manifest"] = self.latent_manifest
        record["datasets"] = self.datasets
        record["global_step"] = trainer.global_step


def training_datasets(datamodule: L.LightningDataModule) -> list[dict[str, Any]]:
    """The latent-shard folders a run draws from, each as ``path``, ``name``, ``num_samples``, ``resolution``
    and, with ``data=mixed``, its ``data.datasets`` entry (``repeats``, ``weight``, ``is_reg``, ...) and the
    share of the draws it gets (``probability``). Empty for data modules of other kinds (raw images, DreamBooth's
    instance and class images: their config names their folders)."""
    if isinstance(datamodule, MixedLatentDataModule):
        return [
            {
                **asdict(spec),
                "num_samples": manifest.num_samples,
                "resolution": manifest.resolution,
                "probability": probability,
            }
            for spec, manifest, probability in zip(
                datamodule.specs, datamodule.manifests, datamodule.probs, strict=True
            )
        ]
    if isinstance(datamodule, LatentShardDataModule):
        manifest = datamodule.manifest
        name = str(datamodule.train_dir).rstrip("/").rsplit("/", 1)[-1]
        return [
            {
                "path": str(datamodule.train_dir),
                "name": name,
                "num_samples": manifest.num_samples,
                "resolution": manifest.resolution,
            }
        ]
    return []
