"""Save a UNet's LoRA adapters where users load them.

- diffusers: ``pytorch_lora_weights.safetensors`` (``pipe.load_lora_weights(folder)``), with the
  adapter's rank/alpha in the file's metadata;
- kohya / AUTOMATIC1111 / ComfyUI: ``lora_unet_<module path with _>.lora_down.weight``,
  ``.lora_up.weight`` and ``.alpha`` (``lora_te_...`` for a CLIP text encoder).
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline
from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_kohya
from peft.utils import get_peft_model_state_dict
from safetensors.torch import save_file

from trainer.lora.adapters import LoraSettings

DIFFUSERS_LORA_FILE = "pytorch_lora_weights.safetensors"
KOHYA_LORA_FILE = "lora_kohya.safetensors"


def unet_lora_state_dict(unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adapter weights of ``unet`` in peft's naming (``...to_q.lora_A.weight``)."""
    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(unet).items()}


def save_diffusers_lora(folder: str | Path, lora_state: dict[str, torch.Tensor], settings: LoraSettings) -> Path:
    """Write ``folder/pytorch_lora_weights.safetensors`` in diffusers' LoRA layout."""
    StableDiffusionPipeline.save_lora_weights(
        save_directory=str(folder),
        unet_lora_layers=convert_state_dict_to_diffusers(lora_state),
        safe_serialization=True,
        unet_lora_adapter_metadata=settings.peft_config().to_dict(),
    )
    return Path(folder) / DIFFUSERS_LORA_FILE


def kohya_state_dict(lora_state: dict[str, torch.Tensor], settings: LoraSettings) -> dict[str, torch.Tensor]:
    """peft-named UNet adapter weights → kohya's keys, with ``alpha`` per module (the scale is alpha/rank)."""
    kohya = convert_state_dict_to_kohya({f"unet.{k}": v for k, v in lora_state.items()})
    return {
        key.replace("lora_te1_", "lora_te_"): (
            torch.tensor(float(settings.alpha)) if key.endswith(".alpha") else value.contiguous()
        )
        for key, value in kohya.items()
    }


def save_kohya_lora(path: str | Path, lora_state: dict[str, torch.Tensor], settings: LoraSettings) -> Path:
    """Write the adapters as one kohya-layout ``.safetensors`` file."""
    metadata = {"ss_network_module": "networks.lora", "ss_network_dim": str(settings.rank),
                "ss_network_alpha": str(settings.alpha)}  # fmt: skip
    save_file(kohya_state_dict(lora_state, settings), str(path), metadata=metadata)
    return Path(path)


def save_lora_files(folder: str | Path, lora_state: dict[str, torch.Tensor], settings: LoraSettings) -> None:
    """``folder/pytorch_lora_weights.safetensors`` (diffusers) and ``folder/lora_kohya.safetensors``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_diffusers_lora(folder, lora_state, settings)
    save_kohya_lora(folder / KOHYA_LORA_FILE, lora_state, settings)
