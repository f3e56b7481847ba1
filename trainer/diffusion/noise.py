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


def multires_noise(
    noise: torch.Tensor, iterations: int, discount: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Multi-resolution ("pyramid") noise (Whitaker 2023, "Multi-Resolution Noise for Diffusion Model
    Training", wandb.ai/johnowhitaker/multires_noise; kohya's ``pyramid_noise_like`` in sd-scripts'
    ``library/custom_train_functions.py``, ``--multires_noise_iterations``/``--multires_noise_discount``).

    To the noise ``(B, C, h, w)`` it adds, for level ``i = 0 .. iterations - 1``, ``discount**i`` times white
    noise drawn at ``(max(1, int(h / r_i**i)), max(1, int(w / r_i**i)))`` with ``r_i ~ U[2, 4)`` and upsampled
    bilinearly to ``(h, w)`` (level 0 is at full size, since ``r**0 = 1``); it stops after the first level
    that reaches one pixel, and divides the sum by its standard deviation (over the whole batch) so it has
    unit variance again. Low-frequency components let the model change large areas (kohya recommends 6-10
    iterations with discount 0.3).

    Args:
        noise: white noise ``(B, C, h, w)``.
        iterations: levels added; 0 returns ``noise`` itself.
        discount: the weight ratio of one level to the previous one.
        generator: draws ``r_i`` and then the level's noise, in that order, level by level, on its own
            device (default: the global generators, ``r_i`` on the CPU so that no GPU sync is needed).

    Returns:
        ``(B, C, h, w)`` noise of unit standard deviation, in the dtype of ``noise``.
    """
    if iterations <= 0:
        return noise
    b, c, h, w = noise.shape
    total = noise.float()
    draw_on = generator.device if generator is not None else None
    for level in range(iterations):
        r = 2 + 2 * torch.rand((), generator=generator, device=draw_on or "cpu").item()
        hn, wn = max(1, int(h / r**level)), max(1, int(w / r**level))
        coarse = torch.randn((b, c, hn, wn), generator=generator, device=draw_on or noise.device).to(noise.device)
        total = total + torch.nn.functional.interpolate(coarse, size=(h, w), mode="bilinear") * discount**level
        if hn == 1 or wn == 1:
            break  # the coarsest level is one pixel
    return (total / total.std()).to(noise.dtype)
