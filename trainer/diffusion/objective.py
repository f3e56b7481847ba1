"""The training objective of a LatentDiffusion module, assembled from the pure functions beside it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from diffusers import SchedulerMixin
from diffusers.training_utils import compute_snr

from trainer.diffusion.loss_weights import LossWeighting, UniformWeighting
from trainer.diffusion.noise import offset_noise, perturb_noise
from trainer.diffusion.objectives import diffusion_loss, training_target
from trainer.diffusion.timesteps import TimestepSampler, UniformTimesteps


@dataclass
class Objective:
    """What is sampled and what is minimised at each training step.

    The prediction type and the beta schedule (including zero-terminal-SNR rescaling) belong to the
    noise scheduler's config, which export writes, so samplers read them from there.

    Attributes:
        timesteps: a timestep sampler (uniform, logit-normal, biased).
        loss_weighting: a per-timestep weighting (uniform, min-SNR-gamma, debiased).
        offset_noise: strength of offset noise (0: off; 0.05-0.1 are common).
        input_perturbation: gamma of input perturbation (0: off; the paper uses 0.1).
    """

    timesteps: TimestepSampler = field(default_factory=UniformTimesteps)
    loss_weighting: LossWeighting = field(default_factory=UniformWeighting)
    offset_noise: float = 0.0
    input_perturbation: float = 0.0

    def loss(
        self,
        model: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
        scheduler: SchedulerMixin,
        latents: torch.Tensor,
        text: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The weighted denoising loss of one batch.

        Args:
            model: ``model(x_t, t, text) -> prediction`` ``(B, C, h, w)``.
            scheduler: the training noise scheduler.
            latents: clean latents ``(B, C, h, w)``.
            text: text embeddings ``(B, T, D)``.

        Returns:
            ``(loss, timesteps)``: the scalar loss and the ``(B,)`` timesteps drawn.
        """
        noise = offset_noise(torch.randn_like(latents), self.offset_noise)
        timesteps = self.timesteps(latents.shape[0], scheduler.config.num_train_timesteps, latents.device)
        noisy = scheduler.add_noise(latents, perturb_noise(noise, self.input_perturbation), timesteps)
        target = training_target(scheduler, latents, noise, timesteps)
        weights = self.loss_weighting(compute_snr(scheduler, timesteps), scheduler.config.prediction_type)
        return diffusion_loss(model(noisy, timesteps, text), target, weights), timesteps
