"""FID and KID between two sets of features, computed by torchmetrics.

The features come from any :class:`~trainer.evaluation.features.FeatureExtractor`, extracted
(and, for the reference set, cached) before; torchmetrics' metrics get them through an identity
"feature extractor", so its Fréchet and kernel distances are used as they are.

- FID: Heusel et al. 2017, the Fréchet distance between Gaussians fitted to the two sets,
  ``|mu_r - mu_g|^2 + Tr(S_r + S_g - 2 (S_r S_g)^(1/2))``.
- KID: Bińkowski et al. 2018 ("Demystifying MMD GANs"), the unbiased squared MMD with the kernel
  ``(x.y / D + 1)^3``, averaged over random subsets of both sets (mean and standard deviation).
"""

from __future__ import annotations

import warnings

import torch
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance


class _Given(nn.Module):
    """The identity, posing as a feature extractor of ``num_features`` features."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


def _check(real: torch.Tensor, generated: torch.Tensor, least: int) -> None:
    if real.ndim != 2 or generated.ndim != 2 or real.shape[1] != generated.shape[1]:
        shapes = f"{tuple(real.shape)} and {tuple(generated.shape)}"
        raise ValueError(f"features of shapes {shapes}: expected (N, D) and (M, D)")
    if len(real) < least or len(generated) < least:
        raise ValueError(f"{len(real)} reference and {len(generated)} generated images: need at least {least} of each")


def frechet_distance(real: torch.Tensor, generated: torch.Tensor) -> float:
    """FID between features ``real (N, D)`` and ``generated (M, D)`` (float64 sums and covariances).

    Raises:
        ValueError: fewer than 2 samples in a set, or the feature sizes differ.
    """
    _check(real, generated, 2)
    metric = FrechetInceptionDistance(feature=_Given(real.shape[1]), sync_on_compute=False).to(real.device)
    metric.update(real.to(torch.float64), real=True)
    metric.update(generated.to(real.device, torch.float64), real=False)
    return float(metric.compute())


def kernel_distance(
    real: torch.Tensor, generated: torch.Tensor, subsets: int = 100, subset_size: int = 1000, seed: int = 0
) -> tuple[float, float]:
    """KID (mean, standard deviation over ``subsets``) between ``real (N, D)`` and ``generated (M, D)``.

    Each subset draws ``min(subset_size, N, M)`` samples of each set without replacement, from a
    generator seeded with ``seed`` (the global RNG is left as it was), so a result repeats exactly.
    With ``subset_size >= max(N, M)`` and equal set sizes every subset is the whole set: one exact value.

    Raises:
        ValueError: fewer than 2 samples in a set, or the feature sizes differ.
    """
    _check(real, generated, 2)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*will save all extracted features.*")
        metric = KernelInceptionDistance(
            feature=_Given(real.shape[1]),
            subsets=subsets,
            subset_size=min(subset_size, len(real), len(generated)),
            sync_on_compute=False,
        )
    metric.update(real.to(torch.float64), real=True)
    metric.update(generated.to(real.device, torch.float64), real=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return float(mean), float(std)
