"""Latent shards with each sample's caption in the batch, for steps that encode the text themselves.

A textual-inversion step re-tokenizes the captions (or fills templates) with the new tokens, so the
text embeddings the shards hold are not what it trains on; the caption strings (``KEY.txt``,
:mod:`data_pipelines.latents.format`) ride along as ``captions`` (a list of ``B`` strings) beside the
arrays :class:`~data_pipelines.loading.datamodules.LatentShardDataModule` batches.
"""

from __future__ import annotations

from typing import Any

from torch.utils.data import DataLoader

from data_pipelines.latents.format import CAPTION_KEY, LatentManifest
from data_pipelines.loading.datamodules import LatentCollate, LatentDecoder, LatentShardDataModule

CAPTIONS = "captions"


class _WithCaption:
    """Picklable decode step: the latent sample's arrays, then its caption (``""`` when it has none)."""

    def __init__(self, manifest: LatentManifest) -> None:
        self.arrays = LatentDecoder(manifest)
        self.names = self.arrays.names

    def __call__(self, sample: dict[str, Any]) -> tuple[Any, ...]:
        caption = sample[CAPTION_KEY].decode("utf-8") if CAPTION_KEY in sample else ""
        return (*self.arrays(sample), caption)


class _CollateWithCaptions:
    """:class:`LatentCollate` of the arrays, plus ``captions``: the ``B`` strings."""

    def __init__(self, names: tuple[str, ...]) -> None:
        self.arrays = LatentCollate(names)

    def __call__(self, samples: list[tuple[Any, ...]]) -> dict[str, Any]:
        batch: dict[str, Any] = self.arrays([sample[:-1] for sample in samples])
        batch[CAPTIONS] = [sample[-1] for sample in samples]
        return batch


class CaptionedLatentDataModule(LatentShardDataModule):
    """:class:`LatentShardDataModule` whose batches also hold ``captions`` (list of ``B`` str).

    Args: as :class:`LatentShardDataModule`.
    """

    def train_dataloader(self) -> DataLoader:
        decoder = _WithCaption(self.manifest)
        return self._loader(self.train_urls, self.epoch_samples, decoder, _CollateWithCaptions(decoder.names),
                            train=True, bucketed=bool(self.manifest.bucket_sizes))  # fmt: skip

    def val_dataloader(self) -> DataLoader | list:
        if self.val_manifest is None:
            return []
        decoder = _WithCaption(self.val_manifest)
        urls = self.val_manifest.shard_paths(self.val_dir)
        return self._loader(urls, self.val_manifest.num_samples, decoder, _CollateWithCaptions(decoder.names),
                            train=False, bucketed=bool(self.val_manifest.bucket_sizes))  # fmt: skip
