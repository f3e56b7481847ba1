"""Sample fixed prompts with fixed seeds during training and log the images (and, for the digits
demo, their conditional accuracy).

The frozen VAE and text encoder are loaded, on rank 0 only, from the folders the training data's
latent manifest names; the UNet is the one being trained, with its EMA weights when the EMA
callback is on. Images go to every configured logger that takes them: a PNG grid in the CSV
logger's folder, ``log_image`` for W&B, ``add_image`` for TensorBoard.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from diffusers import AutoencoderKL
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger, WandbLogger
from PIL import Image
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from data_pipelines.latents.text_encoding import TextEncoding
from data_pipelines.raw.sources.digits import digit_caption
from lf_common.object_cache import model_folder
from trainer.callbacks.ema import EMA
from trainer.evaluation.digits_accuracy import DigitsClassifier, conditional_accuracy
from trainer.faults.ranks import single_rank_work
from trainer.sampling.png_info import image_grid
from trainer.sampling.sampler import Sampler, SampleSettings

log = logging.getLogger(__name__)


class ValidationImages(Callback):
    """Every ``every_n_steps`` optimizer steps, sample each prompt ``images_per_prompt`` times.

    Args:
        prompts: the validation prompts.
        every_n_steps: how often (also after the last step).
        images_per_prompt: images per prompt; image ``i`` uses seed ``seed + i``.
        seed: first seed.
        steps: sampling steps.
        guidance_scale: classifier-free guidance scale.
        scheduler: sampling scheduler name (``ddim``, ``euler``, ...).
        tag: name under which images (and metrics) are logged.
    """

    def __init__(
        self,
        prompts: list[str],
        every_n_steps: int = 500,
        images_per_prompt: int = 2,
        seed: int = 0,
        steps: int = 25,
        guidance_scale: float = 7.5,
        scheduler: str = "ddim",
        tag: str = "validation",
    ) -> None:
        self.prompts = list(prompts)
        self.every_n_steps = every_n_steps
        self.images_per_prompt = images_per_prompt
        self.seed = seed
        self.settings = SampleSettings(steps=steps, guidance_scale=guidance_scale, scheduler=scheduler)
        self.tag = tag
        self._frozen: dict[str, Any] | None = None
        self._last_step = -1

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *_: Any) -> None:
        if trainer.global_step % self.every_n_steps == 0:
            self.run(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.run(trainer, pl_module)

    def run(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Sample and log now (rank 0; the other ranks wait for it outside the process group's timeout),
        unless this step was already done."""
        if trainer.global_step == self._last_step or trainer.global_step == 0:
            return
        self._last_step = trainer.global_step
        with single_rank_work(self.tag + " images", trainer.global_step):  # the other ranks wait in the store
            if not trainer.is_global_zero:
                return
            prompts = [p for p in self.prompts for _ in range(self.images_per_prompt)]
            seeds = [self.seed + i for i in range(len(prompts))]
            images = self.sample(trainer, pl_module, prompts, seeds)
            self.log_images(trainer, image_grid(images, columns=self.images_per_prompt))
            self.evaluate(trainer, pl_module, images, prompts)

    def evaluate(
        self, trainer: L.Trainer, pl_module: L.LightningModule, images: list[Image.Image], prompts: list[str]
    ) -> None:
        """Metrics on the sampled images; none here (see :class:`DigitsAccuracy`)."""

    def sample(
        self, trainer: L.Trainer, pl_module: L.LightningModule, prompts: list[str], seeds: list[int]
    ) -> list[Image.Image]:
        """Sample with the training UNet (EMA weights when available) and, when they train (DreamBooth),
        the training text encoder(s); leaves them as they were."""
        frozen = self._load_frozen(trainer, pl_module.device)  # the EMA weights are swapped in for the sampling
        unet, text_encoder = pl_module.unet, getattr(pl_module, "text_encoder", None) or frozen["text_encoder"]
        second = {key: frozen[key] for key in ("text_encoder_2", "tokenizer_2") if key in frozen}  # SDXL's
        if (trained_2 := getattr(pl_module, "text_encoder_2", None)) is not None:  # SDXL DreamBooth trains it too
            second["text_encoder_2"] = trained_2
        modes = {part: part.training for part in (unet, text_encoder, *second.values()) if hasattr(part, "training")}
        try:
            scheduler_config = dict(pl_module.noise_scheduler.config)
            second["text_encoding"] = TextEncoding.recorded(trainer.datamodule.manifest.text_encoder.extra)
            sampler = Sampler(unet, frozen["vae"], text_encoder, frozen["tokenizer"], scheduler_config, **second)
            with torch.no_grad(), _ema_weights(trainer):
                images, _ = sampler.txt2img(prompts, seeds, self.settings)
        finally:
            for part, training in modes.items():
                part.train(training)
        return images

    def _load_frozen(self, trainer: L.Trainer, device: torch.device) -> dict[str, Any]:
        if self._frozen is None:
            manifest = trainer.datamodule.manifest
            load = {"local_files_only": True}
            # the folders the latent manifest names; a URL (shards precomputed from a bucket): its cached copy
            self._frozen = {
                "vae": AutoencoderKL.from_pretrained(model_folder(manifest.vae.path), **load)
                .to(device)
                .requires_grad_(False),
                "text_encoder": CLIPTextModel.from_pretrained(model_folder(manifest.text_encoder.path), **load)
                .to(device)
                .requires_grad_(False),
                "tokenizer": CLIPTokenizer.from_pretrained(model_folder(manifest.tokenizer_path), **load),
            }
            if manifest.text_encoder_2 is not None:  # SDXL's second encoder (with its pooled projection)
                text_2 = model_folder(manifest.text_encoder_2.path)
                tokenizer_2 = model_folder(manifest.tokenizer_2_path)
                encoder_2 = CLIPTextModelWithProjection.from_pretrained(text_2, **load)
                self._frozen["text_encoder_2"] = encoder_2.to(device).requires_grad_(False)
                self._frozen["tokenizer_2"] = CLIPTokenizer.from_pretrained(tokenizer_2, **load)
        return self._frozen

    def log_images(self, trainer: L.Trainer, grid: Image.Image) -> None:
        """Send the grid to each logger that takes images."""
        step = trainer.global_step
        for logger in trainer.loggers:
            if isinstance(logger, CSVLogger):
                folder = Path(logger.log_dir) / "images"
                folder.mkdir(parents=True, exist_ok=True)
                grid.save(folder / f"{self.tag}-step{step:07d}.png")
            elif isinstance(logger, WandbLogger):
                logger.log_image(key=self.tag, images=[grid], step=step)
            elif isinstance(logger, TensorBoardLogger):
                logger.experiment.add_image(self.tag, np.asarray(grid), step, dataformats="HWC")


class DigitsAccuracy(ValidationImages):
    """The digits demo's metric during training: sample "a handwritten digit zero" ... "nine" and log
    the fraction a classifier of real digits reads as the prompted digit (``<tag>/conditional_accuracy``)."""

    def __init__(self, images_per_digit: int = 10, tag: str = "val", **settings: Any) -> None:
        super().__init__([digit_caption(d) for d in range(10)], images_per_prompt=images_per_digit, tag=tag, **settings)
        self._classifier: DigitsClassifier | None = None

    def evaluate(
        self, trainer: L.Trainer, pl_module: L.LightningModule, images: list[Image.Image], prompts: list[str]
    ) -> None:
        self._classifier = self._classifier or DigitsClassifier(size=images[0].size[0])
        accuracy = conditional_accuracy(self._classifier, images, prompts)
        for logger in trainer.loggers:
            logger.log_metrics({f"{self.tag}/conditional_accuracy": accuracy}, step=trainer.global_step)
        trainer.callback_metrics[f"{self.tag}/conditional_accuracy"] = torch.tensor(accuracy)
        log.info("step %d: conditional accuracy %.3f", trainer.global_step, accuracy)


def _ema_weights(trainer: L.Trainer) -> contextlib.AbstractContextManager[None]:
    """The EMA weights in the trained module for the body, when the EMA callback is on."""
    for callback in trainer.callbacks:
        if isinstance(callback, EMA):
            return callback.average_weights()
    return contextlib.nullcontext()
