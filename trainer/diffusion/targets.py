"""Diffusion training targets and the per-sample error (pure functions, no Lightning).

Notation follows Ho et al. 2020 (DDPM) and Salimans & Ho 2022 (v-prediction):
``x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps`` and ``v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0``.
"""

from __future__ import annotations

import torch
from diffusers import SchedulerMixin

from lf_common.errors import ConfigError
from trainer.diffusion.losses import per_sample_loss

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def training_target(
    scheduler: SchedulerMixin, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
) -> torch.Tensor:
    """What the network learns to predict for the scheduler's ``prediction_type``.

    Args:
        scheduler: a diffusers noise scheduler (its ``config.prediction_type`` decides).
        latents: clean latents ``x_0`` ``(B, C, h, w)``.
        noise: the noise ``eps`` ``(B, C, h, w)``.
        timesteps: ``(B,)``.

    Returns:
        ``eps`` (epsilon), ``v`` (v_prediction, Salimans & Ho 2022 eq. 9 in their notation) or ``x_0``.
    """
    prediction_type = scheduler.config.prediction_type
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    if prediction_type == "sample":
        return latents
    raise ConfigError(f"noise scheduler prediction_type={prediction_type!r}: expected one of {PREDICTION_TYPES}")


def per_sample_mse(
    model_output: torch.Tensor, target: torch.Tensor, pixel_weights: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean squared error of each sample ``(B,)``, in float32, for outputs and targets ``(B, C, h, w)``
    (the validation loss, whatever the training loss type: :func:`trainer.diffusion.losses.per_sample_loss`).

    Args:
        pixel_weights: optional ``(B, 1, h, w)`` (or ``(B, C, h, w)``) weights of each element's squared
            error (a loss mask); the mean is still over all elements.
    """
    return per_sample_loss(model_output, target, "l2", pixel_weights=pixel_weights)
