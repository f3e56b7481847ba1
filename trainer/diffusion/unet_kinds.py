"""What kind of diffusers ``UNet2DConditionModel`` a config describes: the one place that decides it.

* SDXL's UNet takes added conditioning (``addition_embed_type: text_time``): the pooled text
  embedding ``(B, P)`` and six size/crop ``time_ids`` ``(B, 6)`` through ``added_cond_kwargs``.
* An inpainting UNet (SD 1.x/2.x inpainting) takes the noisy latents (4 channels), the mask (1) and
  the masked image's latents (4) concatenated: :data:`INPAINTING_IN_CHANNELS` input channels.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

SDXL_ADDITION = "text_time"
"""An SDXL UNet config's ``addition_embed_type`` (pooled text + size/crop time_ids)."""
SDXL_TIME_IDS = 6
"""The size/crop ``time_ids`` an SDXL UNet takes per sample: original size, crop corner, target size."""
INPAINTING_IN_CHANNELS = 9
"""An inpainting UNet's input channels: latents (4) + mask (1) + masked-image latents (4)."""


def is_sdxl_unet(config: Mapping[str, Any]) -> bool:
    """Whether a UNet config (``unet.config``, or its dict) takes SDXL's pooled text and size/crop time_ids."""
    return config.get("addition_embed_type") == SDXL_ADDITION


def is_inpainting_unet(config: Mapping[str, Any]) -> bool:
    """Whether a UNet config (``unet.config``, or its dict) is an inpainting UNet's (9 input channels)."""
    return int(config["in_channels"]) == INPAINTING_IN_CHANNELS


def sdxl_pooled_width(config: Mapping[str, Any]) -> int | None:
    """SDXL's pooled text width ``P`` (the ``text_time`` embedding's input less the time_ids' part), else ``None``."""
    if not is_sdxl_unet(config):
        return None
    return int(config["projection_class_embeddings_input_dim"]) - SDXL_TIME_IDS * int(config["addition_time_embed_dim"])
