"""The DreamBooth data module: prepares the data on the training job's own ranks, then streams
batches of the subject's photos, each with a batch of class images.

Preparation (:func:`~trainer.dreambooth.prepare.prepare_dreambooth`: class images, latent shards)
runs in :meth:`DreamBoothDataModule.setup`, on every rank once Lightning's strategy has started the
processes and their process group, so it works the same under Lightning's own launcher
(``trainer.devices=N``), torchrun and SLURM, with DDP or DeepSpeed. (Lightning's ``prepare_data``
runs on one process per node, which could not split the generation across the ranks.)

The two sets stream as two resampled :class:`LatentShardDataModule` streams (split by rank and
worker like any training data) with epochs of one length, paired batch by batch. Each stream's
position is saved in checkpoints and restored on resume, as for plain training.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.strategies import SingleDeviceStrategy, Strategy
from lightning.pytorch.utilities import CombinedLoader
from lightning.pytorch.utilities.seed import isolate_rng

from data_pipelines.latents.format import LatentManifest
from data_pipelines.latents.text_encoding import TextEncoding
from data_pipelines.loading.datamodules import LatentShardDataModule
from data_pipelines.shards.corrupt_samples import SampleCounts
from lf_common.object_store import as_path
from trainer.dreambooth.prepare import ClassImages, prepare_dreambooth
from trainer.faults.watchdog import guarded_ranks
from trainer.sampling.sampler import SampleSettings

log = logging.getLogger(__name__)


class DreamBoothDataModule(L.LightningDataModule):
    """Yields ``{"instance": batch, "class": batch}`` (``"class"`` only with prior preservation);
    each batch is ``latents (B, C, h, w)`` and ``text (B, T, D)`` as from :class:`LatentShardDataModule`.

    Args:
        instance_dir: a handful of photos of the subject (non-image files are an error; ``.txt`` is ignored).
        instance_prompt: their caption, with a rare identifier: ``"a photo of sks cat"``.
        pretrained: the base model, a diffusers pipeline folder: it generates the class images, and its
            VAE and text encoder encode both sets.
        cache_dir: raw and latent shards of both sets (reused by later runs while up to date).
        resolution: the training resolution (resize + center crop).
        class_prompt: the class's prompt (``"a photo of a cat"``); ``None`` turns prior preservation off.
        class_dir: the class images' folder (default ``<cache_dir>/class_images``); existing images are reused.
        num_class_images: how many class images prior preservation uses.
        class_sample_steps, class_guidance_scale: how the base model samples the class images.
        class_sample_batch_size: class images per sampler call.
        batch_size: instance samples per batch on each rank (and as many class samples).
        num_workers: loader worker processes per rank, for each of the two streams.
        shuffle_buffer: shuffle buffer in samples.
        seed: shard and shuffle seed of the streams; class image ``i`` is sampled with seed ``seed + i``.
        timeout_s: ``distributed.timeout_s``: while ranks wait for the preparation of others (through the
            store, never in a collective) a rank that has died is named after this long.
        max_token_length, clip_skip: how the prompts are embedded (long prompts, the layer read), as
            ``lf-precompute``'s keys of those names; the module's in-step encoding takes the same values.
    """

    def __init__(
        self,
        instance_dir: str,
        instance_prompt: str,
        pretrained: str,
        cache_dir: str,
        resolution: int,
        class_prompt: str | None = None,
        class_dir: str | None = None,
        num_class_images: int = 100,
        class_sample_steps: int = 25,
        class_guidance_scale: float = 7.5,
        class_sample_batch_size: int = 4,
        batch_size: int = 1,
        num_workers: int = 0,
        shuffle_buffer: int = 100,
        seed: int = 0,
        timeout_s: float = 1800.0,
        max_token_length: int = 75,
        clip_skip: int = 1,
    ) -> None:
        super().__init__()
        self.text_encoding = TextEncoding(max_token_length, clip_skip)
        self.instance_dir = instance_dir
        self.instance_prompt = instance_prompt
        self.pretrained = pretrained
        self.cache_dir = Path(cache_dir)
        self.resolution = resolution
        self.classes = (
            ClassImages(
                prompt=class_prompt,
                folder=_class_folder(class_dir) if class_dir else self.cache_dir / "class_images",
                count=num_class_images,
                settings=SampleSettings(
                    steps=class_sample_steps, guidance_scale=class_guidance_scale, height=resolution, width=resolution
                ),
                batch_size=class_sample_batch_size,
                seed=seed,
            )
            if class_prompt is not None
            else None
        )
        self.loader = {"batch_size": batch_size, "num_workers": num_workers, "shuffle_buffer": shuffle_buffer,
                       "seed": seed, "resampled": True}  # fmt: skip
        self.timeout_s = timeout_s
        self.sample_counts = SampleCounts()  # both streams' loader workers, added up
        self.streams: dict[str, LatentShardDataModule] = {}  # "instance" (and "class"), built in setup
        self._restored: dict[str, Any] | None = None  # a position restored before setup

    def setup(self, stage: str) -> None:
        """Prepare the data on every rank (generate this rank's class images, rank 0 encodes; the ranks wait
        for each other through the store, as for validation images), then open the streams. Randomness used
        here leaves the training's random state as it was."""
        if self.streams:
            return
        strategy = self._strategy()
        with isolate_rng(), guarded_ranks(strategy.global_rank, strategy.world_size, self.timeout_s):
            latents = prepare_dreambooth(
                strategy, self.instance_dir, self.instance_prompt, self.cache_dir, self.pretrained,
                self.resolution, self.classes, self.text_encoding,
            )  # fmt: skip
        instance = LatentShardDataModule(str(latents.instance), **self.loader)
        self.streams["instance"] = instance
        if latents.classes is not None:  # epochs as long as the instance stream's: the pairs stay aligned
            self.streams["class"] = LatentShardDataModule(
                str(latents.classes), **{**self.loader, "seed": self.loader["seed"] + 1},
                epoch_samples=instance.manifest.num_samples,
            )  # fmt: skip
        for stream in self.streams.values():
            stream.trainer = self.trainer  # each stream counts the batches the loop consumes
            stream.sample_counts = self.sample_counts
        if self._restored is not None:
            self.load_state_dict(self._restored)

    def _strategy(self) -> Strategy:
        """The training job's strategy; one CPU process when no trainer runs this module."""
        if self.trainer is not None:
            return self.trainer.strategy
        return SingleDeviceStrategy(torch.device("cpu"))

    def _stream(self, name: str) -> LatentShardDataModule:
        if name not in self.streams:
            raise RuntimeError(
                f"DreamBoothDataModule: the {name} data exists once setup() has prepared it (trainer.fit calls "
                "it); read the manifest, uncond_text and loaders after that"
            )
        return self.streams[name]

    @property
    def manifest(self) -> LatentManifest:
        """The instance latents' manifest (names the VAE, text encoder and tokenizer)."""
        return self._stream("instance").manifest

    @property
    def uncond_text(self) -> torch.Tensor:
        """The empty caption's embedding ``(T, D)``."""
        return self._stream("instance").uncond_text

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Each stream takes its corrupt-sample counts off its batch (logged as data/skipped_samples) and
        counts the training batches the loop consumes (its position)."""
        for name, part in batch.items():
            self._stream(name).on_before_batch_transfer(part, dataloader_idx)
        return batch

    def state_dict(self) -> dict[str, Any]:
        """Each stream's position and what it depends on (as :class:`LatentShardDataModule` records it)."""
        return {name: stream.state_dict() for name, stream in self.streams.items()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Resume each stream where the checkpoint left it (kept until :meth:`setup` opens the streams).

        A checkpoint of other streams (prior preservation turned on or off) is not restored; a warning says so.
        """
        if not self.streams:
            self._restored = state_dict
            return
        self._restored = None
        if set(state_dict) != set(self.streams):
            log.warning(
                "data position not restored: the checkpoint has the streams %s, this run %s (data.class_prompt "
                "set or unset since); the streams start afresh",
                sorted(state_dict),
                sorted(self.streams),
            )
            return
        for name, stream in self.streams.items():
            stream.load_state_dict(state_dict[name])

    def train_dataloader(self) -> CombinedLoader:
        loaders = {"instance": self._stream("instance").train_dataloader()}
        if "class" in self.streams:
            loaders["class"] = self.streams["class"].train_dataloader()
        return CombinedLoader(loaders, mode="min_size")

    def val_dataloader(self) -> list:
        return []


def _class_folder(class_dir: str) -> Path | str:
    """``data.class_dir`` as a local folder, or the URL as given (a ``Path`` would fold its ``//``)."""
    return as_path(class_dir)
