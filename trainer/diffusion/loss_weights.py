"""Per-timestep loss weights, as functions of the signal-to-noise ratio ``snr = abar_t / (1 - abar_t)``.

Each weighting is defined for the epsilon loss and carried to the loss the model is trained with.
With ``x_t = a x_0 + s eps`` (``a^2 + s^2 = 1``, ``snr = a^2 / s^2``) and ``v = a eps - s x_0``:

* ``eps - eps_hat = a (v - v_hat)``, so ``|eps - eps_hat|^2 = snr / (snr + 1) |v - v_hat|^2``;
* ``x_0 - x0_hat = -(s / a)(eps - eps_hat)``, so ``|eps - eps_hat|^2 = snr |x_0 - x0_hat|^2``.

A weight ``w`` on the epsilon loss is therefore ``w snr / (snr + 1)`` on the v loss and
``w snr`` on the x_0 loss. Every class returns weights ``(B,)`` for the prediction type given.
"""

from __future__ import annotations

from typing import Protocol

import torch

from lf_common.errors import ConfigError
from trainer.diffusion.targets import PREDICTION_TYPES


class LossWeighting(Protocol):
    """Weights ``(B,)`` for the per-sample losses, from the SNRs ``(B,)`` of their timesteps."""

    def __call__(self, snr: torch.Tensor, prediction_type: str) -> torch.Tensor: ...


def _check(prediction_type: str) -> None:
    if prediction_type not in PREDICTION_TYPES:
        raise ConfigError(f"prediction_type={prediction_type!r}: expected one of {PREDICTION_TYPES}")


class UniformWeighting:
    """Every timestep weighs the same in the loss being trained (Ho et al. 2020's "simple" loss)."""

    def __call__(self, snr: torch.Tensor, prediction_type: str) -> torch.Tensor:
        _check(prediction_type)
        return torch.ones_like(snr)


class MinSNRWeighting:
    """Min-SNR-gamma (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting
    Strategy", eq. 6-8): epsilon-loss weight ``min(snr, gamma) / snr``, so ``min(snr, gamma) / (snr + 1)``
    for v and ``min(snr, gamma)`` for x_0.

    Args:
        gamma: the clamp (the paper recommends 5).
    """

    def __init__(self, gamma: float = 5.0) -> None:
        if gamma <= 0:
            raise ConfigError(f"min-SNR gamma={gamma}: expected > 0")
        self.gamma = gamma

    def __call__(self, snr: torch.Tensor, prediction_type: str) -> torch.Tensor:
        _check(prediction_type)
        clamped = torch.clamp(snr, max=self.gamma)
        if prediction_type == "epsilon":
            # min(snr, g) / snr without 0/0 at a zero-SNR step: 1 below g, g / snr above.
            return torch.where(snr < self.gamma, torch.ones_like(snr), self.gamma / snr.clamp(min=self.gamma))
        if prediction_type == "v_prediction":
            return clamped / (snr + 1)
        return clamped


class DebiasedWeighting:
    """Debiased estimation (Yu et al. 2024, "Debias the Training of Diffusion Models", eq. 11):
    epsilon-loss weight ``1 / sqrt(snr)``, so ``sqrt(snr) / (snr + 1)`` for v and ``sqrt(snr)`` for x_0.

    The SNR is clamped to ``[min_snr, max_snr]`` first: the upper bound 1000 as kohya's sd-scripts
    do, the lower one keeps a zero-terminal-SNR step finite.
    """

    def __init__(self, min_snr: float = 1e-4, max_snr: float = 1000.0) -> None:
        self.min_snr = min_snr
        self.max_snr = max_snr

    def __call__(self, snr: torch.Tensor, prediction_type: str) -> torch.Tensor:
        _check(prediction_type)
        snr = snr.clamp(self.min_snr, self.max_snr)
        if prediction_type == "epsilon":
            return snr.rsqrt()
        if prediction_type == "v_prediction":
            return snr.sqrt() / (snr + 1)
        return snr.sqrt()
