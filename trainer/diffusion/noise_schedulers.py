"""The training noise scheduler: its betas and ``prediction_type`` define the forward process and the target.

``objective.prediction_type`` (set by the objective groups, ``null`` by default) decides the
prediction type: from scratch ``null`` means epsilon; when fine-tuning, the base model's
(``trainer.interop.pretrained.pretrained_noise_scheduler``).
"""

from __future__ import annotations

from typing import Any

from diffusers import DDPMScheduler

from lf_common.errors import ConfigError
from trainer.diffusion.targets import PREDICTION_TYPES

DEFAULT_PREDICTION_TYPE = "epsilon"


def check_prediction_type(prediction_type: str) -> str:
    """``prediction_type`` when it is one diffusers knows; else a ``ConfigError`` listing them."""
    if prediction_type not in PREDICTION_TYPES:
        raise ConfigError(
            f"objective.prediction_type={prediction_type!r}: expected one of {', '.join(PREDICTION_TYPES)}"
        )
    return prediction_type


def training_noise_scheduler(prediction_type: str | None = None, **config: Any) -> DDPMScheduler:
    """A new ``DDPMScheduler`` from ``config`` (betas, timesteps, ...), predicting ``prediction_type``
    (``None``: epsilon)."""
    chosen = check_prediction_type(prediction_type or DEFAULT_PREDICTION_TYPE)
    return DDPMScheduler(prediction_type=chosen, **config)
