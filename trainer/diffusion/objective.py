"""The training objective of a LatentDiffusion module, assembled from the pure functions beside it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from diffusers import SchedulerMixin
from diffusers.training_utils import compute_snr

from trainer.diffusion.loss_weights import LossWeighting, UniformWeighting
from trainer.diffusion.noise import offset_noise, perturb_noise
from trainer.diffusion.targets import per_sample_mse, training_target
from trainer.diffusion.timesteps import TimestepSampler, UniformTimesteps


@dataclass
class LossTerms:
    """One batch's loss: the weighted scalar, the ``(B,)`` timesteps and unweighted errors (for logging)."""

    loss: torch.Tensor
    timesteps: torch.Tensor
    errors: torch.Tensor


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
        *,
        pixel_weights: torch.Tensor | None = None,
        sample_weights: torch.Tensor | None = None,
    ) -> LossTerms:
        """The weighted denoising loss of one batch.

        Args:
            model: ``model(x_t, t, text) -> prediction`` ``(B, C, h, w)``.
            scheduler: the training noise scheduler.
            latents: clean latents ``(B, C, h, w)``.
            text: text embeddings ``(B, T, D)``.
            pixel_weights: optional ``(B, 1, h, w)`` weights of each latent pixel's error (a loss mask).
            sample_weights: optional ``(B,)`` weights of each sample's loss (e.g. a regularization set's).
        """
        noise = offset_noise(torch.randn_like(latents), self.offset_noise)
        timesteps = self.timesteps(latents.shape[0], scheduler.config.num_train_timesteps, latents.device)
        noisy = scheduler.add_noise(latents, perturb_noise(noise, self.input_perturbation), timesteps)
        target = training_target(scheduler, latents, noise, timesteps)
        errors = per_sample_mse(model(noisy, timesteps, text), target, pixel_weights)  # (B,)
        weights = self.loss_weighting(compute_snr(scheduler, timesteps), scheduler.config.prediction_type)
        if sample_weights is not None:
            weights = weights * sample_weights.float()
        return LossTerms(loss=(errors * weights).mean(), timesteps=timesteps, errors=errors.detach())


def fixed_timestep_loss(
    model: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    scheduler: SchedulerMixin,
    latents: torch.Tensor,
    text: torch.Tensor,
    timesteps: list[int],
    seed: int,
) -> torch.Tensor:
    """Unweighted loss averaged over fixed ``timesteps`` with noise drawn from ``seed``: the same
    number for the same weights and data, so validation losses of different runs compare.

    Returns:
        Scalar: the mean over timesteps of the batch's mean squared error.
    """
    generator = torch.Generator(device="cpu").manual_seed(seed)
    losses = []
    for step in timesteps:
        noise = torch.randn(latents.shape, generator=generator).to(latents.device, latents.dtype)
        t = torch.full((latents.shape[0],), step, device=latents.device, dtype=torch.long)
        noisy = scheduler.add_noise(latents, noise, t)
        losses.append(per_sample_mse(model(noisy, t, text), training_target(scheduler, latents, noise, t)).mean())
    return torch.stack(losses).mean()
