"""Sampling schedulers by name; the classes are diffusers'."""

from __future__ import annotations

from typing import Any

from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    SchedulerMixin,
)

SCHEDULERS: dict[str, tuple[type[SchedulerMixin], str]] = {
    "ddim": (DDIMScheduler, "DDIM"),
    "euler": (EulerDiscreteScheduler, "Euler"),
    "euler_a": (EulerAncestralDiscreteScheduler, "Euler a"),
    "dpmpp_2m": (DPMSolverMultistepScheduler, "DPM++ 2M"),
}


def make_scheduler(name: str, config: dict[str, Any]) -> SchedulerMixin:
    """Build the named sampling scheduler from a training scheduler's config (betas, prediction type)."""
    if name not in SCHEDULERS:
        raise ValueError(f"scheduler={name!r}: expected one of {sorted(SCHEDULERS)}")
    return SCHEDULERS[name][0].from_config(config)


def display_name(name: str) -> str:
    """The name AUTOMATIC1111 writes for the scheduler (``"DDIM"``, ``"Euler a"``...)."""
    return SCHEDULERS[name][1]


def begin_at(scheduler: SchedulerMixin, index: int) -> None:
    """Start a scheduler's schedule at step ``index`` (img2img). DDIM keeps no step index; the others do."""
    if not isinstance(scheduler, DDIMScheduler):
        scheduler.set_begin_index(index)
