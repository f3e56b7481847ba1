"""What an SD 2.x UNet predicts (epsilon or v), where its shapes cannot tell: named, read from the file, or tested.

SD 2.x 512 (epsilon) and SD 2.x 768 (v-prediction) share every shape. In order:

1. the user names it (``prediction_type=``);
2. the file says it: our own exports carry their configs (``latentforge.configs``); ComfyUI's saver
   writes a top-level empty ``v_pred`` tensor in a v-prediction model (with ``ztsnr`` beside it for a
   zero-terminal-SNR schedule; ComfyUI reads both for SDXL), which our export writes too
   (:func:`prediction_markers`); SAI's model spec carries ``modelspec.prediction_type`` (``epsilon`` or ``v``);
3. AUTOMATIC1111's test forward pass (``modules/sd_models_config.py``,
   ``is_using_v_parameterization_for_sd2``): at ``t = 999`` on a constant input ``x = 0.5``
   ``(1, 4, 8, 8)`` with a constant context ``0.5`` ``(1, 2, D)``, an epsilon model returns about
   its input (the noise), a v-model about minus the clean image; ``mean(output - x) < -1`` means v.

The outcome and how it was reached are printed and stored with the import.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import UNet2DConditionModel

from lf_common.errors import ConfigError
from trainer.interop.sd_single_file import V_PRED_KEY, ZTSNR_KEY

A1111_THRESHOLD = -1.0
TEST_TIMESTEP = 999
MODELSPEC_KEY = "modelspec.prediction_type"
MODELSPEC_VALUES = {"epsilon": "epsilon", "v": "v_prediction", "v_prediction": "v_prediction"}
OUR_CONFIGS_KEY = "latentforge.configs"
CHOICES = ("epsilon", "v_prediction")


@dataclass(frozen=True)
class PredictionType:
    """The decision: ``value`` (``epsilon`` or ``v_prediction``) and ``how`` (one line, printed and stored)."""

    value: str
    how: str


def from_metadata(metadata: dict[str, str], markers: Sequence[str] = ()) -> PredictionType | None:
    """The prediction type a file states, if any: its safetensors header, or its ``v_pred`` marker (``markers``:
    the :data:`~trainer.interop.sd_single_file.PREDICTION_MARKERS` it carries)."""
    if OUR_CONFIGS_KEY in metadata:
        scheduler = json.loads(metadata[OUR_CONFIGS_KEY]).get("scheduler", {})
        if "prediction_type" in scheduler:
            return PredictionType(scheduler["prediction_type"], f"from the file's metadata ({OUR_CONFIGS_KEY})")
    if V_PRED_KEY in markers:
        return PredictionType("v_prediction", f"from the file's top-level '{V_PRED_KEY}' key (as ComfyUI reads it)")
    value = MODELSPEC_VALUES.get(metadata.get(MODELSPEC_KEY, ""))
    return PredictionType(value, f"from the file's metadata ({MODELSPEC_KEY})") if value else None


@torch.no_grad()
def a1111_statistic(unet: UNet2DConditionModel) -> float:
    """``mean(unet(x, 999, context) - x)`` for ``x = 0.5`` ``(1, C, 8, 8)`` and ``context = 0.5`` ``(1, 2, D)``."""
    parameter = next(unet.parameters())
    x = torch.full((1, unet.config.in_channels, 8, 8), 0.5, dtype=parameter.dtype, device=parameter.device)
    context = torch.full((1, 2, unet.config.cross_attention_dim), 0.5, dtype=parameter.dtype, device=parameter.device)
    timestep = torch.tensor([TEST_TIMESTEP], device=parameter.device)
    output = unet.eval()(x, timestep, encoder_hidden_states=context).sample  # (1, C_out, 8, 8)
    return float((output.float() - x[:, : output.shape[1]].float()).mean())


def by_test_forward(unet: UNet2DConditionModel) -> PredictionType:
    """AUTOMATIC1111's rule on ``unet`` (loaded with the file's weights)."""
    statistic = a1111_statistic(unet)
    value = "v_prediction" if statistic < A1111_THRESHOLD else "epsilon"
    sign = "<" if statistic < A1111_THRESHOLD else ">="
    return PredictionType(
        value,
        f"by AUTOMATIC1111's test forward pass: mean(output - input) at t={TEST_TIMESTEP} is {statistic:.3f} "
        f"{sign} {A1111_THRESHOLD} (pass prediction_type=... if this is wrong)",
    )


def given(prediction_type: str) -> PredictionType:
    """The user's choice, checked."""
    if prediction_type not in CHOICES:
        raise ConfigError(f"prediction_type={prediction_type!r}: expected one of {', '.join(CHOICES)}")
    return PredictionType(prediction_type, "given (prediction_type=)")


def zero_terminal_snr(markers: Sequence[str]) -> bool:
    """Whether a file's markers state a zero-terminal-SNR schedule (``ztsnr`` beside ``v_pred``, as ComfyUI
    reads them)."""
    return V_PRED_KEY in markers and ZTSNR_KEY in markers


def prediction_markers(scheduler_config: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The top-level marker tensors a single file of this schedule carries, as ComfyUI's saver writes them.

    Returns:
        ``{"v_pred": tensor([])}`` for a v-prediction schedule, with ``"ztsnr"`` too when its betas are
        rescaled to zero terminal SNR (``rescale_betas_zero_snr``); ``{}`` for epsilon.
    """
    if scheduler_config.get("prediction_type") != "v_prediction":
        return {}
    markers = {V_PRED_KEY: torch.tensor([])}
    if scheduler_config.get("rescale_betas_zero_snr"):
        markers[ZTSNR_KEY] = torch.tensor([])
    return markers
