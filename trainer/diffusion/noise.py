"""Tweaks of the training noise (pure functions)."""

from __future__ import annotations

import torch


def offset_noise(noise: torch.Tensor, strength: float) -> torch.Tensor:
    """Add a per-sample, per-channel constant to the noise ``(B, C, h, w)``, so the model can change an
    image's mean brightness (Guttenberg 2023, "Diffusion with Offset Noise", crosslabs.org; kohya's
    ``noise_offset``): ``eps + strength * n``, ``n ~ N(0, 1)`` of shape ``(B, C, 1, 1)``."""
    if strength == 0:
        return noise
    offset = torch.randn(noise.shape[0], noise.shape[1], 1, 1, device=noise.device, dtype=noise.dtype)
    return noise + strength * offset


def perturb_noise(noise: torch.Tensor, gamma: float) -> torch.Tensor:
    """Input perturbation (Ning et al. 2023, "Input Perturbation Reduces Exposure Bias in Diffusion
    Models", eq. 9): the model input is noised with ``eps + gamma * xi`` while the target keeps ``eps``.
    Returns the noise to build ``x_t`` with."""
    if gamma == 0:
        return noise
    return noise + gamma * torch.randn_like(noise)
