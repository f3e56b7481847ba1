"""Apply a saved LoRA to a UNet at a scale (the sampler's ``lora=PATH lora_scale=S``).

Reads diffusers' layout (``pytorch_lora_weights.safetensors``, rank/alpha in its metadata) and
kohya's (``lora_unet_*`` with ``.alpha``), both through diffusers' own ``lora_state_dict``.
"""

from __future__ import annotations

import logging
from pathlib import Path

from diffusers import StableDiffusionPipeline, UNet2DConditionModel

from data_pipelines.errors import DataError
from trainer.lora.formats import DIFFUSERS_LORA_FILE

log = logging.getLogger(__name__)


def load_lora_into_unet(
    unet: UNet2DConditionModel, path: str | Path, scale: float = 1.0, adapter_name: str = "lora"
) -> None:
    """Add the LoRA at ``path`` (a ``.safetensors`` file, or a folder holding
    ``pytorch_lora_weights.safetensors``) to ``unet`` and set its scale (1: as trained, 0: off).

    Raises:
        DataError: no such file, or it holds no UNet adapter weights.
    """
    path = Path(path)
    folder, weight_name = (path.parent, path.name) if path.is_file() else (path, DIFFUSERS_LORA_FILE)
    if not (folder / weight_name).is_file():
        raise DataError(
            f"lora={path}: no LoRA file there (expected a .safetensors file or a folder with {DIFFUSERS_LORA_FILE})"
        )
    state, alphas, metadata = StableDiffusionPipeline.lora_state_dict(
        str(folder), weight_name=weight_name, local_files_only=True, return_lora_metadata=True
    )
    if not any(key.startswith("unet.") for key in state):
        raise DataError(f"lora={path}: holds no UNet adapter weights (keys like {sorted(state)[:3]})")
    if any(key.startswith("text_encoder") for key in state):
        log.warning("lora=%s: its text-encoder adapters are not applied (UNet only)", path)
    unet.load_lora_adapter(state, prefix="unet", network_alphas=alphas, adapter_name=adapter_name, metadata=metadata)
    unet.set_adapters([adapter_name], weights=[scale])
