"""The training objective of a LatentDiffusion module, assembled from the pure functions beside it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from diffusers import SchedulerMixin
from diffusers.training_utils import compute_snr

from trainer.diffusion.loss_weights import LossWeighting, UniformWeighting
from trainer.diffusion.losses import check_loss_settings, huber_threshold, per_sample_loss
from trainer.diffusion.noise import multires_noise, offset_noise, perturb_noise
from trainer.diffusion.targets import per_sample_mse, training_target
from trainer.diffusion.timesteps import TimestepSampler, UniformTimesteps


@dataclass
class LossTerms:
    """One batch's loss: the weighted scalar, the ``(B,)`` timesteps and unweighted errors (for logging): each
    sample's mean loss of the configured ``loss_type`` before the per-timestep and per-sample weights."""

    loss: torch.Tensor
    timesteps: torch.Tensor
    errors: torch.Tensor


@dataclass
class Objective:
    """What is sampled and what is minimised at each training step.

    The prediction type and the beta schedule (including zero-terminal-SNR rescaling) belong to the
    noise scheduler's config, which export writes, so samplers read them from there. The validation loss
    (:func:`fixed_timestep_loss`) stays unweighted MSE whatever ``loss_type``, so runs with different
    losses compare on one number.

    Attributes:
        timesteps: a timestep sampler (uniform, logit-normal, biased).
        loss_weighting: a per-timestep weighting (uniform, min-SNR-gamma, debiased).
        offset_noise: strength of offset noise (0: off; 0.05-0.1 are common).
        input_perturbation: gamma of input perturbation (0: off; the paper uses 0.1).
        loss_type: ``l2`` (MSE), ``l1``, ``huber`` or ``smooth_l1`` (:mod:`trainer.diffusion.losses`, as
            kohya's sd-scripts ``--loss_type``).
        huber_schedule: how the Huber threshold follows the timestep: ``constant``, ``exponential`` or
            ``snr`` (kohya's default; :func:`trainer.diffusion.losses.huber_threshold`).
        huber_c: the Huber threshold parameter in ``(0, 1]`` (kohya's default 0.1).
        huber_scale: a factor of the ``constant`` and ``exponential`` thresholds (kohya's default 1).
        multires_noise_iterations: levels of multi-resolution noise added to the noise (0: off; kohya
            recommends 6-10; :func:`trainer.diffusion.noise.multires_noise`).
        multires_noise_discount: the weight ratio of one level to the previous (kohya's default 0.3).
    """

    timesteps: TimestepSampler = field(default_factory=UniformTimesteps)
    loss_weighting: LossWeighting = field(default_factory=UniformWeighting)
    offset_noise: float = 0.0
    input_perturbation: float = 0.0
    loss_type: str = "l2"
    huber_schedule: str = "snr"
    huber_c: float = 0.1
    huber_scale: float = 1.0
    multires_noise_iterations: int = 0
    multires_noise_discount: float = 0.3

    def __post_init__(self) -> None:
        check_loss_settings(self.loss_type, self.huber_schedule, self.huber_c, self.huber_scale)

    def huber_c_of(self, scheduler: SchedulerMixin, timesteps: torch.Tensor) -> torch.Tensor | None:
        """The ``(B,)`` Huber thresholds of ``timesteps`` for ``huber`` and ``smooth_l1``; ``None`` for the others."""
        if self.loss_type not in ("huber", "smooth_l1"):
            return None
        steps = scheduler.config.num_train_timesteps
        return huber_threshold(
            self.huber_schedule, self.huber_c, self.huber_scale, timesteps, scheduler.alphas_cumprod, steps
        )

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
            pixel_weights: optional ``(B, 1, h, w)`` weights of each latent element's loss (a loss mask), whatever
                the loss type.
            sample_weights: optional ``(B,)`` weights of each sample's loss (e.g. a regularization set's).
        """
        noise = offset_noise(torch.randn_like(latents), self.offset_noise)
        noise = multires_noise(noise, self.multires_noise_iterations, self.multires_noise_discount)
        timesteps = self.timesteps(latents.shape[0], scheduler.config.num_train_timesteps, latents.device)
        noisy = scheduler.add_noise(latents, perturb_noise(noise, self.input_perturbation), timesteps)
        target = training_target(scheduler, latents, noise, timesteps)
        prediction = model(noisy, timesteps, text)
        errors = per_sample_loss(
            prediction, target, self.loss_type, self.huber_c_of(scheduler, timesteps), pixel_weights
        )  # (B,)
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
