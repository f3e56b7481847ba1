"""LatentDiffusion: trains a diffusers UNet on precomputed latents and text embeddings.

The module holds the UNet only: no VAE and no text encoder run in the training step, because the
latent shards already hold their outputs (see ``data_pipelines.latent_format``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from diffusers import SchedulerMixin, UNet2DConditionModel
from torch.optim import Optimizer

from trainer.diffusion.objective import Objective

CHECKPOINT_KEY = "latentforge"


class LatentDiffusion(L.LightningModule):
    """Denoising training of a conditional UNet in latent space.

    Args:
        unet: the network, ``unet(x_t (B,C,h,w), t (B,), encoder_hidden_states (B,T,D))``.
        noise_scheduler: a diffusers training scheduler (``DDPMScheduler``): its betas and
            ``prediction_type`` define the forward process and the target.
        optimizer: a partial taking the parameters (``_partial_: true`` in the config).
        lr_scheduler: a partial taking the optimizer, stepped every optimizer step; or ``None``.
        caption_dropout: probability of replacing a sample's text embedding with ``uncond_text``
            (so the model learns the unconditional score classifier-free guidance needs).
        uncond_text: the empty caption's embedding ``(T, D)``; needed when ``caption_dropout > 0``.
        objective: timestep sampling, loss weighting and noise tweaks (default: uniform, unweighted).
    """

    def __init__(
        self,
        unet: UNet2DConditionModel,
        noise_scheduler: SchedulerMixin,
        optimizer: Callable[..., Optimizer],
        lr_scheduler: Callable[[Optimizer], Any] | None = None,
        caption_dropout: float = 0.0,
        uncond_text: torch.Tensor | None = None,
        objective: Objective | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(
            ignore=["unet", "noise_scheduler", "optimizer", "lr_scheduler", "uncond_text", "objective"], logger=False
        )
        if caption_dropout > 0 and uncond_text is None:
            raise ValueError("caption_dropout > 0 needs uncond_text, the empty caption's embedding")
        self.unet = unet
        self.noise_scheduler = noise_scheduler
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.caption_dropout = caption_dropout
        self.objective = objective or Objective()
        self.register_buffer("uncond_text", uncond_text, persistent=False)

    def drop_captions(self, text: torch.Tensor) -> torch.Tensor:
        """Replace each sample's text ``(B, T, D)`` by the empty caption's with probability ``caption_dropout``."""
        if self.caption_dropout <= 0:
            return text
        drop = torch.rand(text.shape[0], device=text.device) < self.caption_dropout  # (B,)
        return torch.where(drop[:, None, None], self.uncond_text.to(text.dtype), text)

    def compute_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The denoising loss of one batch.

        Args:
            batch: ``latents`` ``(B, C, h, w)`` and ``text`` ``(B, T, D)`` (any float dtype).
        """
        latents = batch["latents"].to(self.dtype)
        text = self.drop_captions(batch["text"].to(self.dtype))
        loss, _ = self.objective.loss(self._predict, self.noise_scheduler, latents, text)
        return loss

    def _predict(self, noisy: torch.Tensor, timesteps: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        return self.unet(noisy, timesteps, encoder_hidden_states=text).sample

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.compute_loss(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["latents"].shape[0])
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.compute_loss(batch)
        self.log("val/loss", loss, prog_bar=True, batch_size=batch["latents"].shape[0], sync_dist=True)
        return loss

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory(params=[p for p in self.unet.parameters() if p.requires_grad])
        if self.lr_scheduler_factory is None:
            return optimizer
        scheduler = self.lr_scheduler_factory(optimizer=optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Store what rebuilds the UNet and the scheduler without the training code."""
        record = checkpoint.setdefault(CHECKPOINT_KEY, {})
        record["unet_config"] = dict(self.unet.config)
        record["noise_scheduler_config"] = dict(self.noise_scheduler.config)
