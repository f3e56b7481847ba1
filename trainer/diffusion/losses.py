"""Element-wise training losses and kohya's scheduled Huber threshold (pure functions, no Lightning).

The loss shapes and the threshold schedule are those of kohya-ss/sd-scripts (``library/train_util.py``:
``conditional_loss`` and ``get_huber_threshold_if_needed``, arguments ``--loss_type``, ``--huber_schedule``,
``--huber_c``, ``--huber_scale``), which implement Khrapov et al. 2024, "Improving Diffusion Models's
Data-Corruption Resistance using Scheduled Pseudo-Huber Loss" (arXiv 2403.16728). With the residual
``r = prediction - target`` and a threshold ``c > 0``:

* ``l2``: ``r^2`` (the default; plain MSE);
* ``l1``: ``|r|``;
* ``huber``: ``2 c (sqrt(r^2 + c^2) - c)``, i.e. twice the pseudo-Huber function
  ``c (sqrt(r^2 + c^2) - c)`` (:func:`pseudo_huber`): ``r^2`` (= l2) for ``|r| << c``, ``2 c |r|`` for ``|r| >> c``;
* ``smooth_l1``: ``2 (sqrt(r^2 + c^2) - c)``: ``r^2 / c`` for ``|r| << c``, ``2 |r|`` for ``|r| >> c``.

The factor 2 is kohya's (and diffusers' examples'): it makes ``huber`` equal MSE for small residuals, so
switching from ``l2`` keeps the loss's scale, and settings carry over from kohya unchanged.
"""

from __future__ import annotations

import math

import torch

from lf_common.errors import ConfigError

LOSS_TYPES = ("l2", "l1", "huber", "smooth_l1")
HUBER_SCHEDULES = ("constant", "exponential", "snr")


def check_loss_settings(loss_type: str, huber_schedule: str, huber_c: float, huber_scale: float) -> None:
    """Refuse an unknown loss type or schedule, or a threshold that is not positive, naming the key.

    Raises:
        ConfigError: one line naming ``model.objective.<key>`` and what it takes.
    """
    if loss_type not in LOSS_TYPES:
        raise ConfigError(f"model.objective.loss_type={loss_type!r}: expected one of {', '.join(LOSS_TYPES)}")
    if huber_schedule not in HUBER_SCHEDULES:
        raise ConfigError(
            f"model.objective.huber_schedule={huber_schedule!r}: expected one of {', '.join(HUBER_SCHEDULES)}"
        )
    if not 0 < huber_c <= 1:
        raise ConfigError(f"model.objective.huber_c={huber_c}: expected 0 < huber_c <= 1 (kohya's default 0.1)")
    if huber_scale <= 0:
        raise ConfigError(f"model.objective.huber_scale={huber_scale}: expected > 0 (kohya's default 1.0)")


def huber_threshold(
    schedule: str,
    huber_c: float,
    huber_scale: float,
    timesteps: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    num_train_timesteps: int,
) -> torch.Tensor:
    """The Huber threshold ``c_t`` ``(B,)`` of each sample's timestep (kohya's ``get_huber_threshold_if_needed``).

    * ``constant``: ``c_t = huber_c * huber_scale``;
    * ``exponential``: ``c_t = huber_scale * exp(-alpha t)`` with ``alpha = -ln(huber_c) / T``, i.e.
      ``huber_scale * huber_c ** (t / T)``: from ``huber_scale`` at ``t = 0`` down to ``huber_c * huber_scale``;
    * ``snr``: ``c_t = (1 - huber_c) / (1 + sigma_t)^2 + huber_c`` with ``sigma_t = sqrt((1 - abar_t) / abar_t)``
      (Khrapov et al. 2024, sec. 3.2): near 1 (MSE-like) at low noise, ``huber_c`` (robust) at high noise.
      As in kohya, ``huber_scale`` does not enter this schedule.

    Args:
        schedule: ``constant``, ``exponential`` or ``snr``.
        huber_c: the threshold parameter in ``(0, 1]``.
        huber_scale: a factor of the ``constant`` and ``exponential`` thresholds.
        timesteps: ``(B,)`` integer timesteps.
        alphas_cumprod: the scheduler's ``abar`` ``(T,)``.
        num_train_timesteps: ``T``.

    Returns:
        ``(B,)`` float32 thresholds on the device of ``timesteps``.
    """
    t = timesteps.to(torch.float32)
    if schedule == "constant":
        return torch.full_like(t, huber_c * huber_scale)
    if schedule == "exponential":
        alpha = -math.log(huber_c) / num_train_timesteps
        return torch.exp(-alpha * t) * huber_scale
    if schedule == "snr":
        abar = alphas_cumprod.to(timesteps.device, torch.float64)[timesteps.long()]  # (B,)
        sigmas = ((1.0 - abar) / abar).sqrt()  # inf at a zero-terminal-SNR step: c_t = huber_c there
        return ((1 - huber_c) / (1 + sigmas) ** 2 + huber_c).to(torch.float32)
    raise ConfigError(f"model.objective.huber_schedule={schedule!r}: expected one of {', '.join(HUBER_SCHEDULES)}")


def pseudo_huber(residual: torch.Tensor, c: torch.Tensor | float) -> torch.Tensor:
    """The pseudo-Huber function ``c (sqrt(r^2 + c^2) - c) = c^2 (sqrt(1 + (r / c)^2) - 1)`` (Charbonnier et al.
    1997; Khrapov et al. 2024, eq. 4): ``r^2 / 2`` for ``|r| << c`` and ``c |r| - c^2`` for ``|r| >> c``; smooth
    everywhere, so its gradient ``c r / sqrt(r^2 + c^2)`` is bounded by ``c``.

    Computed as ``c r^2 / (sqrt(r^2 + c^2) + c)``, the same number without the cancellation that the
    difference suffers in float32 for ``|r| << c`` (where it would lose every digit below ``1e-7 c``)."""
    squared = residual.pow(2)
    return c * squared / (torch.sqrt(squared + c**2) + c)


def elementwise_loss(
    model_output: torch.Tensor, target: torch.Tensor, loss_type: str, huber_c: torch.Tensor | None = None
) -> torch.Tensor:
    """Each element's loss ``(B, C, h, w)`` in float32 (kohya's ``conditional_loss`` with ``reduction="none"``).

    Args:
        model_output, target: ``(B, C, h, w)`` of any float dtype.
        loss_type: ``l2``, ``l1``, ``huber`` or ``smooth_l1`` (module docstring).
        huber_c: ``(B,)`` thresholds (:func:`huber_threshold`); needed by ``huber`` and ``smooth_l1``.
    """
    residual = model_output.float() - target.float()
    if loss_type == "l2":
        return residual.pow(2)
    if loss_type == "l1":
        return residual.abs()
    if loss_type not in LOSS_TYPES:
        raise ConfigError(f"model.objective.loss_type={loss_type!r}: expected one of {', '.join(LOSS_TYPES)}")
    if huber_c is None:
        raise ValueError(f"loss_type={loss_type!r} needs huber_c, the (B,) thresholds of huber_threshold()")
    c = huber_c.float().view(-1, *([1] * (residual.ndim - 1)))  # (B, 1, 1, 1)
    if loss_type == "huber":
        return 2 * pseudo_huber(residual, c)
    return 2 * pseudo_huber(residual, c) / c  # smooth_l1: 2 (sqrt(r^2 + c^2) - c)


def per_sample_loss(
    model_output: torch.Tensor,
    target: torch.Tensor,
    loss_type: str = "l2",
    huber_c: torch.Tensor | None = None,
    pixel_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Each sample's mean loss ``(B,)`` in float32, for outputs and targets ``(B, C, h, w)``.

    Args:
        loss_type, huber_c: as :func:`elementwise_loss`.
        pixel_weights: optional ``(B, 1, h, w)`` (or ``(B, C, h, w)``) weights of each element's loss (a loss
            mask), whatever the loss type; the mean is still over all elements (as kohya's masked loss).
    """
    loss = elementwise_loss(model_output, target, loss_type, huber_c)
    if pixel_weights is not None:
        loss = loss * pixel_weights.float()
    return loss.mean(dim=tuple(range(1, target.ndim)))
