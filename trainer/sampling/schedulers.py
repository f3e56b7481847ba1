"""Sampling schedulers by name; the classes are diffusers'."""

from __future__ import annotations

from typing import Any

import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    SchedulerMixin,
)

from lf_common.errors import ConfigError

SCHEDULERS: dict[str, tuple[type[SchedulerMixin], str]] = {
    "ddim": (DDIMScheduler, "DDIM"),
    "euler": (EulerDiscreteScheduler, "Euler"),
    "euler_a": (EulerAncestralDiscreteScheduler, "Euler a"),
    "dpmpp_2m": (DPMSolverMultistepScheduler, "DPM++ 2M"),
}


# Schedulers whose diffusers class takes ``use_karras_sigmas`` (Karras et al. 2022, eq. 5).
KARRAS = frozenset(["euler", "dpmpp_2m"])
KARRAS_SUFFIX = " Karras"


def check_scheduler(name: str, use_karras_sigmas: bool = False) -> None:
    """Raise ``ValueError`` for an unknown name, or Karras sigmas on a scheduler without them."""
    if name not in SCHEDULERS:
        raise ConfigError(f"scheduler={name!r}: expected one of {sorted(SCHEDULERS)}")
    if use_karras_sigmas and name not in KARRAS:
        raise ConfigError(
            f"use_karras_sigmas=true: scheduler={name!r} has no Karras sigmas; use one of {sorted(KARRAS)}"
        )


def make_scheduler(name: str, config: dict[str, Any], use_karras_sigmas: bool = False) -> SchedulerMixin:
    """Build the named sampling scheduler from a training scheduler's config (betas, prediction type).

    Args:
        use_karras_sigmas: the noise levels of Karras et al. 2022 (eq. 5, rho=7) instead of the
            training schedule's (``euler`` and ``dpmpp_2m`` only).
    """
    check_scheduler(name, use_karras_sigmas)
    extra = {"use_karras_sigmas": True} if use_karras_sigmas else {}
    return SCHEDULERS[name][0].from_config(config, **extra)


def sampling_scheduler(
    name: str, config: dict[str, Any], use_karras_sigmas: bool, steps: int, device: str | torch.device
) -> SchedulerMixin:
    """:func:`make_scheduler` with ``set_timesteps(steps)`` called.

    Raises:
        ConfigError: Karras sigmas that repeat timesteps at this many steps on this noise schedule.
    """
    scheduler = make_scheduler(name, config, use_karras_sigmas)
    scheduler.set_timesteps(steps, device=device)
    if use_karras_sigmas and len(set(scheduler.timesteps.tolist())) < len(scheduler.timesteps):
        raise ConfigError(
            f"use_karras_sigmas=true with steps={steps} repeats timesteps "
            f"{scheduler.timesteps.tolist()} on this noise schedule "
            f"({config.get('beta_schedule')}); "
            "use more steps or use_karras_sigmas=false"
        )
    return scheduler


def display_name(name: str, use_karras_sigmas: bool = False) -> str:
    """The name AUTOMATIC1111 writes for the scheduler (``"DDIM"``, ``"Euler a"``, ``"DPM++ 2M Karras"``...)."""
    return SCHEDULERS[name][1] + (KARRAS_SUFFIX if use_karras_sigmas else "")


def from_display_name(text: str) -> tuple[str, bool]:
    """AUTOMATIC1111's sampler name -> ``(scheduler name, use_karras_sigmas)``.

    Raises:
        ValueError: a sampler this project does not have.
    """
    karras = text.endswith(KARRAS_SUFFIX)
    base = text[: -len(KARRAS_SUFFIX)] if karras else text
    for name, (_, shown) in SCHEDULERS.items():
        if shown == base:
            return name, karras
    known = sorted(shown for _, shown in SCHEDULERS.values())
    raise ConfigError(f"Sampler: {text!r} is not one of {known} (optionally with ' Karras')")


def begin_at(scheduler: SchedulerMixin, index: int) -> None:
    """Start a scheduler's schedule at step ``index`` (img2img). DDIM keeps no step index; the others do."""
    if not isinstance(scheduler, DDIMScheduler):
        scheduler.set_begin_index(index)
