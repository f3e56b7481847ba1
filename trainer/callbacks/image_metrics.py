"""FID, KID and CLIP score while training: what ``lf-eval`` measures, every N steps, on every rank.

Every ``every_n_steps`` optimizer steps (and after the last) the UNet being trained (its EMA
weights when the EMA callback is on) generates one image per (prompt, seed) of a fixed set, each
rank its equal share (:class:`~trainer.evaluation.distributed.RankShare`); the features are
gathered and every rank computes the same metrics, logged as ``<tag>/fid``, ``<tag>/kid`` and
``<tag>/clip_score`` (and put in ``trainer.callback_metrics``, so a sweep can optimise them), with
a grid of the first images. The reference features are extracted once, split across the ranks,
when fitting starts (or read from the cache).

Why no rank waits long enough to trip the process group's timeout: every collective here follows
an equal amount of work on every rank (the shares differ by at most one padded image), and the
training step's collectives resume right after.
"""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
import torch

from trainer.callbacks.validation_images import ValidationImages
from trainer.evaluation.distributed import RankShare
from trainer.evaluation.evaluator import ImageEvaluator, gather_images
from trainer.evaluation.features import FeatureExtractor
from trainer.evaluation.prompts import read_prompt_set
from trainer.evaluation.reference import ReferenceSet
from trainer.sampling.png_info import image_grid

log = logging.getLogger(__name__)
LOGGED = ("fid", "kid", "clip_score")


class ImageMetrics(ValidationImages):
    """Log FID and KID (against ``reference``) and CLIP score (with ``clip``) of images sampled in training.

    Args:
        prompts: the prompts (or give ``prompt_file`` or ``prompt_shards``).
        prompt_file: one prompt per line (a local file or a URL).
        prompt_shards: raw shards whose captions are the prompts (``max_prompts`` of them); URLs streamed.
        max_prompts: only the first N prompts.
        features: the feature extractor for FID and KID.
        reference: the real images (a folder of images, raw shards, or a reference set); a URL's shards
            are streamed, its folder of images downloaded once into the download cache (``$LF_CACHE_DIR``).
        clip: a CLIP folder for the CLIP score (local, or a URL: downloaded once).
        every_n_steps: how often (also after the last step).
        images_per_prompt: images per prompt; image ``i`` uses seed ``seed + i``.
        seed: first seed; also KID's subset draws.
        steps, guidance_scale, scheduler: sampling settings.
        tag: the metrics' prefix (``val/fid``, ...) and the grid's name.
        cache_dir: where reference features are cached (``None``: recomputed each run).
        kid_subsets, kid_subset_size: KID's subsets.
        batch_size: images per feature-extractor call.
        grid_images: images in the logged grid.
    """

    def __init__(
        self,
        prompts: list[str] | None = None,
        prompt_file: str | None = None,
        prompt_shards: str | list[str] | None = None,
        max_prompts: int | None = None,
        features: FeatureExtractor | None = None,
        reference: str | Path | ReferenceSet | None = None,
        clip: str | None = None,
        every_n_steps: int = 1000,
        images_per_prompt: int = 1,
        seed: int = 0,
        steps: int = 25,
        guidance_scale: float = 7.5,
        scheduler: str = "ddim",
        tag: str = "val",
        cache_dir: str | None = None,
        kid_subsets: int = 100,
        kid_subset_size: int = 1000,
        batch_size: int = 64,
        grid_images: int = 16,
    ) -> None:
        prompt_set = read_prompt_set(prompts, prompt_file, prompt_shards, max_prompts)
        super().__init__(prompt_set, every_n_steps, images_per_prompt, seed, steps, guidance_scale, scheduler, tag)
        self.evaluator = ImageEvaluator(
            features, reference, clip, cache_dir, kid_subsets, kid_subset_size, seed, batch_size
        )
        self.grid_images = grid_images
        self.evaluator.check_count(len(self.prompts) * images_per_prompt)

    def _image_size(self, trainer: L.Trainer, pl_module: L.LightningModule) -> tuple[int, int]:
        vae = self._load_frozen(trainer, pl_module.device)["vae"]
        side = pl_module.unet.config.sample_size * 2 ** (len(vae.config.block_out_channels) - 1)
        return side, side

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Move the extractor and CLIP to the training device; extract (or read) the reference features."""
        self.evaluator.to(pl_module.device)
        self.evaluator.prepare(self._image_size(trainer, pl_module))

    def run(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Sample this rank's share, score all ranks' images, log (every rank takes part)."""
        if trainer.global_step == self._last_step or trainer.global_step == 0:
            return
        self._last_step = trainer.global_step
        prompts = [p for p in self.prompts for _ in range(self.images_per_prompt)]
        share = RankShare.current(len(prompts))
        my_prompts = [prompts[i] for i in share.indices]
        images = self.sample(trainer, pl_module, my_prompts, [self.seed + i for i in share.indices])
        metrics = self.evaluator.evaluate(share, images, my_prompts)
        grid = gather_images(share, images, self.grid_images)
        if trainer.is_global_zero and grid:
            self.log_images(trainer, image_grid(grid, columns=min(len(grid), max(self.images_per_prompt, 4))))
        logged = {f"{self.tag}/{name}": metrics[name] for name in LOGGED if name in metrics}
        for logger in trainer.loggers:
            logger.log_metrics(logged, step=trainer.global_step)
        trainer.callback_metrics.update({name: torch.tensor(value) for name, value in logged.items()})
        log.info("step %d: %s", trainer.global_step, ", ".join(f"{k} {v:.4g}" for k, v in logged.items()))
