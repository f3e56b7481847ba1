"""FID, KID and CLIP score of generated images, each rank scoring its share (``lf-eval`` and the
in-loop :class:`~trainer.callbacks.image_metrics.ImageMetrics` callback run this same code)."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch
from PIL import Image

from trainer.evaluation.clip_score import clip_score_metric
from trainer.evaluation.distance import frechet_distance, kernel_distance
from trainer.evaluation.distributed import RankShare, gather_rows
from trainer.evaluation.features import FeatureExtractor, extract_features, images_to_tensor, tensor_to_images
from trainer.evaluation.reference import ReferenceFeatures, ReferenceSet, open_reference, reference_features

log = logging.getLogger(__name__)


class ImageEvaluator:
    """Scores generated images against a reference set (FID, KID) and their prompts (CLIP score).

    Either part may be left out: without ``features`` and ``reference`` no FID/KID, without
    ``clip`` no CLIP score.

    Args:
        features: the feature extractor for FID and KID.
        reference: the real images (see :func:`~trainer.evaluation.reference.open_reference`; URLs too).
        clip: a CLIP folder for the CLIP score (local, or a URL: downloaded once).
        cache_dir: where reference features are cached (``None``: not cached); local.
        kid_subsets: KID's number of subsets.
        kid_subset_size: KID's subset size (at most the smaller set's size is used).
        seed: seed of KID's subset draws.
        batch_size: images per feature-extractor call.
        download_cache_dir: where ``reference`` and ``clip`` given by URL are downloaded, when they must
            be (a folder of images, a model folder; ``None``: ``$LF_CACHE_DIR``, else the default).
    """

    def __init__(
        self,
        features: FeatureExtractor | None = None,
        reference: str | Path | ReferenceSet | None = None,
        clip: str | Path | None = None,
        cache_dir: str | Path | None = None,
        kid_subsets: int = 100,
        kid_subset_size: int = 1000,
        seed: int = 0,
        batch_size: int = 64,
        download_cache_dir: str | Path | None = None,
    ) -> None:
        if (features is None) != (reference is None):
            raise ValueError("FID and KID need both a feature extractor (features) and a reference set (reference)")
        if features is None and clip is None:
            raise ValueError("nothing to measure: give features and reference (FID, KID), or clip (CLIP score)")
        self.features = features.eval() if features is not None else None
        self.reference = open_reference(reference, download_cache_dir) if reference is not None else None
        self.clip = clip_score_metric(clip, download_cache_dir) if clip else None
        self.cache_dir = cache_dir
        self.kid_subsets, self.kid_subset_size, self.seed = kid_subsets, kid_subset_size, seed
        self.batch_size = batch_size
        self.reference_features: ReferenceFeatures | None = None

    def check_count(self, count: int) -> None:
        """Refuse fewer than 2 images to score (FID and KID need 2), before anything is generated."""
        if self.features is not None and count < 2:
            raise ValueError(
                f"{count} image(s) to score: FID and KID need at least 2 (more prompts or images per prompt)"
            )

    def to(self, device: torch.device | str) -> ImageEvaluator:
        """Move the extractor and CLIP model to ``device``."""
        for module in (self.features, self.clip):
            if module is not None:
                module.to(device)
        return self

    def prepare(self, size: tuple[int, int]) -> ReferenceFeatures | None:
        """Load (or extract, split across ranks, and cache) the reference features for images of
        ``size`` ``(height, width)``. Every rank must call this."""
        if self.features is None or self.reference is None:
            return None
        if self.reference_features is None or self.reference_features.key.preprocessing["size"] != list(size):
            self.reference_features = reference_features(
                self.reference, self.features, size, self.cache_dir, self.batch_size
            )
        return self.reference_features

    def evaluate(self, share: RankShare, images: list[Image.Image], prompts: list[str] | None) -> dict[str, float]:
        """The metrics over all ranks' images; every rank calls this with its share and gets the result.

        Args:
            share: this rank's share of the generated images.
            images: this rank's images, one per slot of ``share`` (padding slots included).
            prompts: each image's prompt (for the CLIP score), or ``None``.

        Returns:
            ``fid``, ``kid``, ``kid_std`` (with a reference set), ``clip_score`` (with CLIP and
            prompts), ``num_images`` and ``num_reference``.
        """
        if len(images) != share.slots:
            raise ValueError(f"{len(images)} images for {share.slots} slots")
        results: dict[str, float] = {"num_images": float(share.total)}
        if self.features is not None and images:
            reference = self.prepare((images[0].height, images[0].width))
            local = extract_features(self.features, images, self.batch_size)  # (slots, D)
            generated = gather_rows(local, share.total)  # (N, D), item order, on every rank
            real = reference.features.to(generated.device)
            results["fid"] = frechet_distance(real, generated)
            results["kid"], results["kid_std"] = kernel_distance(
                real, generated, self.kid_subsets, self.kid_subset_size, self.seed
            )
            results["num_reference"] = float(len(real))
        if self.clip is not None and prompts is not None:
            self.clip.reset()
            mine = [i for i, valid in enumerate(share.valid) if valid]
            if mine:
                device = next(self.clip.parameters()).device
                self.clip.update(images_to_tensor([images[i] for i in mine]).to(device), [prompts[i] for i in mine])
            results["clip_score"] = float(self.clip.compute())  # summed over ranks by torchmetrics
        return results


def gather_images(share: RankShare, images: list[Image.Image], count: int) -> list[Image.Image]:
    """The first ``count`` images of all ranks, in item order, on every rank (for a sample grid)."""
    count = min(count, share.total)
    if count == 0:
        return []
    slots = math.ceil(count / share.world)
    local = images_to_tensor(images[:slots])  # (slots, 3, H, W)
    gathered = gather_rows(local, min(share.total, slots * share.world))
    return tensor_to_images(gathered[:count])
