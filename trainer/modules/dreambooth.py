"""DreamBooth with prior preservation (Ruiz et al. 2023, "DreamBooth: Fine Tuning Text-to-Image
Diffusion Models for Subject-Driven Generation", eq. 2): the denoising loss on the subject's photos
plus ``prior_loss_weight`` times the loss on images the base model made for the class prompt, so
the class keeps its variety while the rare identifier learns the subject."""

from __future__ import annotations

from typing import Any

import torch

from trainer.modules.latent_diffusion import LatentDiffusion


class DreamBoothDiffusion(LatentDiffusion):
    """:class:`LatentDiffusion` on ``{"instance": batch, "class": batch}`` batches.

    Args:
        prior_loss_weight: weight of the class (prior-preservation) loss.
        *args, **kwargs: as :class:`LatentDiffusion`.
    """

    def __init__(self, *args: Any, prior_loss_weight: float = 1.0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.prior_loss_weight = prior_loss_weight

    def training_step(self, batch: dict[str, dict[str, torch.Tensor]], batch_idx: int) -> torch.Tensor:
        size = batch["instance"]["latents"].shape[0]
        loss = instance_loss = self.compute_loss(batch["instance"]).loss
        self.log("train/instance_loss", instance_loss, batch_size=size)
        if "class" in batch:
            prior_loss = self.compute_loss(batch["class"]).loss
            loss = instance_loss + self.prior_loss_weight * prior_loss
            self.log("train/prior_loss", prior_loss, batch_size=size)
        self.log("train/loss", loss, prog_bar=True, batch_size=size)
        return loss


def batch_size(batch: dict[str, dict[str, torch.Tensor]]) -> int:
    """Samples in a DreamBooth batch, instance and class (for Lightning's ``ThroughputMonitor``)."""
    return sum(part["latents"].shape[0] for part in batch.values())
