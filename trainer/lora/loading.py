"""Apply a saved LoRA to a UNet and text encoder at a scale (the sampler's ``lora=PATH lora_scale=S``).

Reads diffusers' layout (``pytorch_lora_weights.safetensors``, rank/alpha in its metadata) and
kohya's (``lora_unet_*``, ``lora_te_*`` with ``.alpha``), both through diffusers' own
``lora_state_dict``, and loads each part with diffusers' loaders, as ``pipe.load_lora_weights`` does.
"""

from __future__ import annotations

from pathlib import Path

from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from diffusers.loaders.lora_base import set_adapters_for_text_encoder
from transformers import CLIPTextModel

from lf_common.errors import DataError
from trainer.lora.formats import DIFFUSERS_LORA_FILE


def load_lora(
    unet: UNet2DConditionModel,
    text_encoder: CLIPTextModel,
    path: str | Path,
    scale: float = 1.0,
    adapter_name: str = "lora",
) -> list[str]:
    """Add the LoRA at ``path`` (a ``.safetensors`` file, or a folder holding
    ``pytorch_lora_weights.safetensors``) to the UNet and, when the file has text-encoder adapters,
    to the text encoder; set its scale (1: as trained, 0: off).

    Returns:
        The parts that received adapters: ``["unet"]`` or ``["unet", "text_encoder"]``.

    Raises:
        DataError: no such file, or it holds no adapter weights for either part.
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
    parts = [part for part in ("unet", "text_encoder") if any(key.startswith(part + ".") for key in state)]
    if not parts:
        raise DataError(f"lora={path}: holds no UNet or text-encoder adapter weights (keys like {sorted(state)[:3]})")
    if "unet" in parts:
        unet.load_lora_adapter(
            state, prefix="unet", network_alphas=alphas, adapter_name=adapter_name, metadata=metadata
        )
        unet.set_adapters([adapter_name], weights=[scale])
    if "text_encoder" in parts:
        StableDiffusionPipeline.load_lora_into_text_encoder(
            state, alphas, text_encoder, prefix="text_encoder", adapter_name=adapter_name, metadata=metadata
        )
        set_adapters_for_text_encoder([adapter_name], text_encoder, [scale])
    return parts
