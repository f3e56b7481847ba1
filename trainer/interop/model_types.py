"""Which Stable Diffusion model a single file holds: the table of model types, and the standard configs of each.

A type is recognised by two facts of its (normalised, see :mod:`trainer.interop.layouts`) keys
and shapes, its *signature*:

* the text encoder's layout: OpenAI CLIP (``cond_stage_model.transformer.*``, SD 1.x), OpenCLIP
  (``cond_stage_model.model.*``, SD 2.x) or SDXL's two encoders (``conditioner.embedders.*``);
* the UNet's input channels (``model.diffusion_model.input_blocks.0.0.weight``, ``(C, in, 3, 3)``):
  4 for text-to-image, 9 for inpainting (latents + mask + masked-image latents), 8 for InstructPix2Pix.

Types with one signature differ by what the weights cannot show (SD 2.x 512 epsilon and 768
v-prediction share every shape); :mod:`trainer.interop.prediction_type` tells them apart.
Each supported type ships its diffusers configs in ``conf/base_models/<name>/`` (``unet.json``,
``vae.json``, ``text_encoder.json``, ``tokenizer.json``, ``scheduler.json``, and SDXL's
``text_encoder_2.json`` and ``tokenizer_2.json``: the reference models' own, e.g.
``stable-diffusion-v1-5``'s and ``stable-diffusion-xl-base-1.0``'s). The same signatures as diffusers'
``infer_diffusers_model_type`` (``tests/unit/test_model_types.py`` checks it on full-size shapes).

To add a type: a row in :data:`MODEL_TYPES`, its configs folder, its text-encoder key map, and its
layout rows in :mod:`trainer.interop.layouts`. A type without a configs folder imports only with
the configs a file carries (our exports) or ``config_dir`` (:attr:`ModelType.has_standard_configs`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

import torch

from trainer.diffusion.unet_kinds import INPAINTING_IN_CHANNELS
from trainer.interop.sd_single_file import OPEN_CLIP_PREFIX, TEXT_PREFIX, UNET_PREFIX, KeyMapError

CONFIGS_PACKAGE = "latentforge_conf"
CONFIGS_FOLDER = "base_models"
PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
SDXL_PARTS = ("text_encoder_2", "tokenizer_2")  # beside PARTS in an SDXL type's folder
SDXL_PREFIX = "conditioner.embedders."
UNET_CONV_IN = UNET_PREFIX + "input_blocks.0.0.weight"  # (C, in_channels, 3, 3)


@dataclass(frozen=True)
class ModelType:
    """One row of the table.

    Attributes:
        name: the folder of its configs under ``conf/base_models/`` and the name stored with an import.
        title: what is printed.
        text_encoder: ``"clip"`` (SD 1.x), ``"open_clip"`` (SD 2.x) or ``"sdxl"``.
        in_channels: the UNet's input channels.
        prediction_type: what its UNet predicts (``epsilon`` or ``v_prediction``).
        refused: why it cannot be imported yet (empty: supported).
    """

    name: str
    title: str
    text_encoder: str
    in_channels: int
    prediction_type: str = "epsilon"
    refused: str = ""

    @property
    def signature(self) -> tuple[str, int]:
        return self.text_encoder, self.in_channels

    @property
    def inpainting(self) -> bool:
        return self.in_channels == INPAINTING_IN_CHANNELS

    @property
    def has_standard_configs(self) -> bool:
        """Whether ``conf/base_models/<name>/`` ships this type's configs."""
        return (resources.files(CONFIGS_PACKAGE) / CONFIGS_FOLDER / self.name).is_dir()

    def configs(self) -> dict[str, dict[str, Any]]:
        """The standard configs of this type, by part (copies: callers may change them)."""
        return {part: dict(config) for part, config in _standard_configs(self.name).items()}


MODEL_TYPES: tuple[ModelType, ...] = (
    ModelType("sd1", "SD 1.x", "clip", 4),
    ModelType("sd1_inpainting", "SD 1.x inpainting", "clip", INPAINTING_IN_CHANNELS),
    ModelType("sd2", "SD 2.x 512 (epsilon)", "open_clip", 4),
    ModelType("sd2_v", "SD 2.x 768 (v-prediction)", "open_clip", 4, "v_prediction"),
    ModelType("sd2_inpainting", "SD 2.x inpainting", "open_clip", INPAINTING_IN_CHANNELS),
    ModelType("instruct_pix2pix", "InstructPix2Pix (SD 1.x)", "clip", 8, refused="not supported"),
    ModelType("sdxl", "SDXL base", "sdxl", 4),
    ModelType("sdxl_inpainting", "SDXL inpainting", "sdxl", INPAINTING_IN_CHANNELS, refused="not supported yet"),
)
BY_NAME = {row.name: row for row in MODEL_TYPES}


@cache
def _standard_configs(name: str) -> dict[str, dict[str, Any]]:
    folder = resources.files(CONFIGS_PACKAGE) / CONFIGS_FOLDER / name
    parts = PARTS + tuple(part for part in SDXL_PARTS if (folder / f"{part}.json").is_file())
    return {part: json.loads((folder / f"{part}.json").read_text(encoding="utf-8")) for part in parts}


def text_encoder_kind(state: Mapping[str, torch.Tensor]) -> str | None:
    """``"clip"``, ``"open_clip"``, ``"sdxl"``, or ``None`` when no text encoder is there."""
    if any(key.startswith(SDXL_PREFIX) for key in state):
        return "sdxl"
    if any(key.startswith(OPEN_CLIP_PREFIX) for key in state):
        return "open_clip"
    if any(key.startswith(TEXT_PREFIX) for key in state):
        return "clip"
    return None


def signature(state: Mapping[str, torch.Tensor], source: str) -> tuple[str, int]:
    """The (text encoder layout, UNet input channels) of a normalised single-file state dict.

    Raises:
        KeyMapError: no UNet input convolution or no text encoder (named, with ``source``).
    """
    kind = text_encoder_kind(state)
    if UNET_CONV_IN not in state or kind is None:
        missing = [UNET_CONV_IN] * (UNET_CONV_IN not in state) + ["a text encoder"] * (kind is None)
        raise KeyMapError(f"{source}: not a Stable Diffusion checkpoint: {' and '.join(missing)} not found")
    return kind, int(state[UNET_CONV_IN].shape[1])


def candidates(state: Mapping[str, torch.Tensor], source: str) -> list[ModelType]:
    """The supported types a file can be (several when only the prediction type tells them apart).

    Raises:
        KeyMapError: the file is of a known type that is refused, or of none in the table (both named).
    """
    found = signature(state, source)
    rows = [row for row in MODEL_TYPES if row.signature == found]
    refused = [row for row in rows if row.refused]
    if refused:
        raise KeyMapError(f"{source}: {refused[0].title} checkpoint: {refused[0].refused}")
    if not rows:
        known = ", ".join(f"{row.title} ({row.text_encoder}, {row.in_channels} channels)" for row in MODEL_TYPES)
        raise KeyMapError(
            f"{source}: a {found[0]} text encoder with a {found[1]}-channel UNet is no known model type; known: {known}"
        )
    return rows
