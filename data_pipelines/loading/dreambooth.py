"""The DreamBooth data module: batches of the subject's photos, each with a batch of class images.

Both sets were encoded once into latent shards by the preparation step
(``trainer.dreambooth.prepare``); this module streams them as two resampled latent-shard streams
(split by rank and worker like any training data) and pairs them batch by batch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.utilities import CombinedLoader

from data_pipelines.loading.datamodules import LatentShardDataModule
from data_pipelines.shards.streaming import SampleCounts, take_counts


class DreamBoothDataModule(L.LightningDataModule):
    """Yields ``{"instance": batch, "class": batch}`` (``"class"`` only with prior preservation);
    each batch is ``latents (B, C, h, w)`` and ``text (B, T, D)`` as from :class:`LatentShardDataModule`.

    Args:
        cache_dir: the preparation's folder (``instance/latents``, ``class/latents``).
        class_prompt: the class prompt; ``None`` turns prior preservation off.
        batch_size: instance samples per batch (and as many class samples).
        num_workers, shuffle_buffer, seed: as for :class:`LatentShardDataModule`.
        preparation: the preparation step's settings (``instance_dir``, ``instance_prompt``,
            ``class_dir``, ``num_class_images``, ``resolution``), read from the same config node by
            ``prepare.dreambooth``; not used here.
    """

    def __init__(
        self,
        cache_dir: str,
        class_prompt: str | None,
        batch_size: int = 1,
        num_workers: int = 0,
        shuffle_buffer: int = 100,
        seed: int = 0,
        **preparation: Any,
    ) -> None:
        super().__init__()
        loader = {"batch_size": batch_size, "num_workers": num_workers, "shuffle_buffer": shuffle_buffer,
                  "seed": seed, "resampled": True}  # fmt: skip
        self.instance = LatentShardDataModule(str(Path(cache_dir) / "instance" / "latents"), **loader)
        self.classes = (
            LatentShardDataModule(str(Path(cache_dir) / "class" / "latents"), **{**loader, "seed": seed + 1})
            if class_prompt is not None
            else None
        )
        self.manifest = self.instance.manifest
        self.uncond_text = self.instance.uncond_text
        self.sample_counts = SampleCounts()  # both streams' loader workers, added up

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Take each stream's corrupt-sample counts off its batch (logged as data/skipped_samples)."""
        for part in batch.values():
            self.sample_counts.add(*take_counts(part))
        return batch

    def train_dataloader(self) -> CombinedLoader:
        loaders = {"instance": self.instance.train_dataloader()}
        if self.classes is not None:
            loaders["class"] = self.classes.train_dataloader()
        return CombinedLoader(loaders, mode="min_size")

    def val_dataloader(self) -> list:
        return []
