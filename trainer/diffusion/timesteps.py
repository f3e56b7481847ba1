"""Training timestep samplers: each returns ``(B,)`` integer timesteps in ``[0, num_train_timesteps)``."""

from __future__ import annotations

from typing import Protocol

import torch

from lf_common.errors import ConfigError


class TimestepSampler(Protocol):
    """Draws ``(B,)`` training timesteps."""

    def __call__(self, batch_size: int, num_train_timesteps: int, device: torch.device) -> torch.Tensor: ...


class UniformTimesteps:
    """Uniform over all timesteps (Ho et al. 2020, Algorithm 1)."""

    def __call__(self, batch_size: int, num_train_timesteps: int, device: torch.device) -> torch.Tensor:
        return torch.randint(0, num_train_timesteps, (batch_size,), device=device)


class LogitNormalTimesteps:
    """``t = T * sigmoid(n)``, ``n ~ N(mean, std)``: more weight on the middle of the schedule
    (Esser et al. 2024, "Scaling Rectified Flow Transformers", sec. 3.1, "logit-normal sampling").

    Args:
        mean: location of ``n`` (negative: more low-noise steps; positive: more high-noise steps).
        std: scale of ``n``.
    """

    def __init__(self, mean: float = 0.0, std: float = 1.0) -> None:
        self.mean = mean
        self.std = std

    def __call__(self, batch_size: int, num_train_timesteps: int, device: torch.device) -> torch.Tensor:
        n = torch.randn(batch_size, device=device) * self.std + self.mean
        t = (torch.sigmoid(n) * num_train_timesteps).long()
        return t.clamp(0, num_train_timesteps - 1)


class BiasedTimesteps:
    """Uniform, except that timesteps in ``[begin, end)`` are ``multiplier`` times as likely
    (the timestep bias of diffusers' SDXL training script and SimpleTuner; ``multiplier=0`` leaves
    the range out, as kohya's ``min_timestep``/``max_timestep`` do).

    Args:
        begin: first timestep of the range.
        end: end of the range (exclusive); ``None`` for the last timestep.
        multiplier: relative probability of a timestep inside the range.
    """

    def __init__(self, begin: int = 0, end: int | None = None, multiplier: float = 2.0) -> None:
        if multiplier < 0:
            raise ConfigError(f"timestep bias multiplier={multiplier}: expected >= 0")
        self.begin = begin
        self.end = end
        self.multiplier = multiplier

    def weights(self, num_train_timesteps: int) -> torch.Tensor:
        """Unnormalised probabilities ``(T,)`` of each timestep."""
        end = num_train_timesteps if self.end is None else self.end
        if not 0 <= self.begin < end <= num_train_timesteps:
            raise ConfigError(f"timestep range [{self.begin}, {end}) not within [0, {num_train_timesteps})")
        weights = torch.ones(num_train_timesteps)
        weights[self.begin : end] = self.multiplier
        if weights.sum() == 0:
            raise ConfigError("timestep bias leaves no timestep to sample")
        return weights

    def __call__(self, batch_size: int, num_train_timesteps: int, device: torch.device) -> torch.Tensor:
        return torch.multinomial(self.weights(num_train_timesteps), batch_size, replacement=True).to(device)
