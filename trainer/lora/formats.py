"""Save LoRA adapters (of the UNet and, when it trained with one, the CLIP text encoder) where users
load them.

- diffusers: ``pytorch_lora_weights.safetensors`` (``pipe.load_lora_weights(folder)``), with each
  part's rank/alpha in the file's metadata;
- kohya / AUTOMATIC1111 / ComfyUI: ``lora_unet_<module path with _>.lora_down.weight``,
  ``.lora_up.weight`` and ``.alpha``, and ``lora_te_text_model_...`` for the text encoder;
- LoHa and LoKr adapters (trained on from a LyCORIS file) in LyCORIS' layout (kohya names).

Text-encoder keys are written in the layout of SD's CLIP checkpoints and of LoRA files in the wild
(``text_model.encoder.layers.N.self_attn.q_proj``). transformers 5's ``CLIPTextModel`` names its
modules without the ``text_model.`` level; diffusers and transformers map either form on load.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline
from diffusers.utils import convert_state_dict_to_kohya
from peft.utils import get_peft_model_state_dict
from safetensors.torch import save_file

from trainer.lora.adapters import LoraSettings
from trainer.lora.lycoris import to_lycoris_file

DIFFUSERS_LORA_FILE = "pytorch_lora_weights.safetensors"
KOHYA_LORA_FILE = "lora_kohya.safetensors"
LYCORIS_FILE = "lora_lycoris.safetensors"
CLIP_TEXT_MODEL_PREFIX = "text_model."


@dataclass
class AdapterWeights:
    """One model's LoRA adapters.

    Attributes:
        state: peft-named weights, e.g. ``...to_q.lora_A.weight`` ``(rank, in)`` and
            ``...to_q.lora_B.weight`` ``(out, rank)``.
        settings: the rank, alpha and targets they were trained with.
    """

    state: dict[str, torch.Tensor]
    settings: LoraSettings


def adapter_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adapter weights of ``model`` in peft's naming (``...to_q.lora_A.weight``)."""
    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}


def canonical_text_encoder_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``encoder.layers.0...`` (transformers 5) → ``text_model.encoder.layers.0...`` (SD's CLIP layout)."""
    return {k if k.startswith(CLIP_TEXT_MODEL_PREFIX) else CLIP_TEXT_MODEL_PREFIX + k: v for k, v in state.items()}


def save_diffusers_lora(folder: str | Path, unet: AdapterWeights | None, text_encoder: AdapterWeights | None) -> Path:
    """Write ``folder/pytorch_lora_weights.safetensors`` in diffusers' LoRA layout, peft's names (``lora_A``,
    ``lora_B``) under ``unet.`` / ``text_encoder.``, which diffusers' loaders read as they are.

    (diffusers' older ``lora.down``/``lora.up`` names cover attention projections only: with convolutions
    among the targets, ``convert_state_dict_to_diffusers`` renames some keys and not others, and
    diffusers then loads only the converted ones.)
    """
    StableDiffusionPipeline.save_lora_weights(
        save_directory=str(folder),
        unet_lora_layers=unet.state if unet else None,
        text_encoder_lora_layers=canonical_text_encoder_keys(text_encoder.state) if text_encoder else None,
        safe_serialization=True,
        unet_lora_adapter_metadata=unet.settings.peft_config().to_dict() if unet else None,
        text_encoder_lora_adapter_metadata=text_encoder.settings.peft_config().to_dict() if text_encoder else None,
    )
    return Path(folder) / DIFFUSERS_LORA_FILE


def kohya_state_dict(
    unet: AdapterWeights | None, text_encoder: AdapterWeights | None = None
) -> dict[str, torch.Tensor]:
    """peft-named adapter weights → kohya's keys (``lora_unet_*``, ``lora_te_*``), with each module's
    ``alpha`` (kohya scales the update by alpha/rank)."""
    kohya: dict[str, torch.Tensor] = {}
    for part, weights, key_prefix in (("unet", unet, "lora_unet_"), ("text_encoder", text_encoder, "lora_te_")):
        if weights is None:
            continue
        state = canonical_text_encoder_keys(weights.state) if part == "text_encoder" else weights.state
        converted = convert_state_dict_to_kohya({f"{part}.{k}": v for k, v in state.items()})
        alpha = float(weights.settings.alpha)
        kohya.update({
            key.replace("lora_te1_", key_prefix): torch.tensor(alpha) if key.endswith(".alpha") else value.contiguous()
            for key, value in converted.items()
        })  # fmt: skip
    return kohya


def save_kohya_lora(path: str | Path, unet: AdapterWeights | None, text_encoder: AdapterWeights | None) -> Path:
    """Write the adapters as one kohya-layout ``.safetensors`` file."""
    main = unet or text_encoder
    assert main is not None, "nothing to save"
    metadata = {"ss_network_module": "networks.lora", "ss_network_dim": str(main.settings.rank),
                "ss_network_alpha": str(main.settings.alpha),
                "ss_network_train_unet_only": str(text_encoder is None)}  # fmt: skip
    save_file(kohya_state_dict(unet, text_encoder), str(path), metadata=metadata)
    return Path(path)


def save_lycoris(path: str | Path, unet: AdapterWeights | None, text_encoder: AdapterWeights | None) -> Path:
    """Write LoHa/LoKr adapters as one LyCORIS file (kohya names; A1111, ComfyUI and ``lf-sample lora=`` read it)."""
    state: dict[str, torch.Tensor] = {}
    for part, weights in (("unet", unet), ("text_encoder", text_encoder)):
        if weights is not None:
            state |= to_lycoris_file(part, weights.state, weights.settings)
    main = unet or text_encoder
    assert main is not None, "nothing to save"
    metadata = {"ss_network_module": "lycoris.kohya", "ss_network_args": json.dumps({"algo": main.settings.kind}),
                "ss_network_dim": str(main.settings.rank), "ss_network_alpha": str(main.settings.alpha)}  # fmt: skip
    save_file(state, str(path), metadata=metadata)
    return Path(path)


def save_lora_files(
    folder: str | Path, unet: AdapterWeights | None, text_encoder: AdapterWeights | None = None
) -> None:
    """``folder/pytorch_lora_weights.safetensors`` (diffusers) and ``folder/lora_kohya.safetensors``; LoHa and
    LoKr adapters (which diffusers' LoRA format cannot hold) as ``folder/lora_lycoris.safetensors``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if (unet or text_encoder).settings.kind != "lora":
        save_lycoris(folder / LYCORIS_FILE, unet, text_encoder)
        return
    save_diffusers_lora(folder, unet, text_encoder)
    save_kohya_lora(folder / KOHYA_LORA_FILE, unet, text_encoder)
