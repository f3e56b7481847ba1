"""Save LoRA adapters (of the UNet and, when it trained with one, the CLIP text encoder(s)) where users
load them.

- diffusers: ``pytorch_lora_weights.safetensors`` (``pipe.load_lora_weights(folder)``), with each
  part's rank/alpha in the file's metadata (parts ``unet.``, ``text_encoder.``, and SDXL's ``text_encoder_2.``);
- kohya / AUTOMATIC1111 / ComfyUI: ``lora_unet_<module path with _>.lora_down.weight``,
  ``.lora_up.weight`` and ``.alpha``, and ``lora_te_text_model_...`` for the text encoder. SDXL's
  layout (kohya's sd-scripts trains SDXL on the ldm UNet): the UNet's modules under their ldm names
  (``lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q``; the caller passes the map, from the
  single-file key map) and the two text encoders as ``lora_te1_*`` and ``lora_te2_*``;
- LoHa and LoKr adapters (trained on from a LyCORIS file) in LyCORIS' layout (kohya names).

Text-encoder keys are written in the layout of SD's CLIP checkpoints and of LoRA files in the wild
(``text_model.encoder.layers.N.self_attn.q_proj``). transformers 5's ``CLIPTextModel`` names its
modules without the ``text_model.`` level; diffusers and transformers map either form on load.
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from diffusers.utils import convert_state_dict_to_kohya
from safetensors.torch import save_file

from lf_common.errors import ConfigError
from trainer.diffusion.unet_kinds import is_sdxl_unet
from trainer.interop.lycoris import ModuleNames, to_lycoris_file
from trainer.interop.sd_single_file import original_module_name, unet_rules
from trainer.lora.adapters import AdapterWeights

DIFFUSERS_LORA_FILE = "pytorch_lora_weights.safetensors"
KOHYA_LORA_FILE = "lora_kohya.safetensors"
LYCORIS_FILE = "lora_lycoris.safetensors"
CLIP_TEXT_MODEL_PREFIX = "text_model."
LORA_MARKERS = (".lora_A.", ".lora_B.")  # peft's names: the adapted module's path comes before them


def sdxl_lora_names(unet: torch.nn.Module) -> ModuleNames | None:
    """For an SDXL UNet, its modules' ldm names (what kohya's SDXL LoRA files use); ``None`` for SD 1.x/2.x."""
    return partial(original_module_name, rules=unet_rules(unet.config)) if is_sdxl_unet(unet.config) else None


def canonical_text_encoder_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``encoder.layers.0...`` (transformers 5) → ``text_model.encoder.layers.0...`` (SD's CLIP layout)."""
    return {k if k.startswith(CLIP_TEXT_MODEL_PREFIX) else CLIP_TEXT_MODEL_PREFIX + k: v for k, v in state.items()}


def save_diffusers_lora(
    folder: str | Path,
    unet: AdapterWeights | None,
    text_encoder: AdapterWeights | None,
    text_encoder_2: AdapterWeights | None = None,
) -> Path:
    """Write ``folder/pytorch_lora_weights.safetensors`` in diffusers' LoRA layout, peft's names (``lora_A``,
    ``lora_B``) under ``unet.`` / ``text_encoder.`` (/ SDXL's ``text_encoder_2.``), which diffusers' loaders
    read as they are.

    (diffusers' older ``lora.down``/``lora.up`` names cover attention projections only: with convolutions
    among the targets, ``convert_state_dict_to_diffusers`` renames some keys and not others, and
    diffusers then loads only the converted ones.)
    """
    text_parts = {"text_encoder": text_encoder} | ({"text_encoder_2": text_encoder_2} if text_encoder_2 else {})
    text_layers = {
        f"{part}_lora_layers": canonical_text_encoder_keys(weights.state) if weights else None
        for part, weights in text_parts.items()
    }
    text_metadata = {
        f"{part}_lora_adapter_metadata": weights.settings.peft_config().to_dict() if weights else None
        for part, weights in text_parts.items()
    }
    pipeline = StableDiffusionXLPipeline if text_encoder_2 else StableDiffusionPipeline
    pipeline.save_lora_weights(
        save_directory=str(folder),
        unet_lora_layers=unet.state if unet else None,
        safe_serialization=True,
        unet_lora_adapter_metadata=unet.settings.peft_config().to_dict() if unet else None,
        **text_layers,
        **text_metadata,
    )
    return Path(folder) / DIFFUSERS_LORA_FILE


def renamed_modules(state: dict[str, torch.Tensor], names: ModuleNames) -> dict[str, torch.Tensor]:
    """peft-named adapter weights with each adapted module's path renamed by ``names``
    (``down_blocks.1.attentions.0.proj_in.lora_A.weight`` -> ``input_blocks.4.1.proj_in.lora_A.weight``)."""
    out = {}
    for key, tensor in state.items():
        marker = next((m for m in LORA_MARKERS if m in key), None)
        if marker is None:
            raise ConfigError(f"LoRA weight {key!r}: expected peft's .lora_A./.lora_B. names")
        module, rest = key.split(marker, 1)
        out[names(module) + marker + rest] = tensor
    return out


def kohya_state_dict(
    unet: AdapterWeights | None,
    text_encoder: AdapterWeights | None = None,
    text_encoder_2: AdapterWeights | None = None,
    sdxl_unet_names: ModuleNames | None = None,
) -> dict[str, torch.Tensor]:
    """peft-named adapter weights → kohya's keys, with each module's ``alpha`` (kohya scales the update
    by alpha/rank): ``lora_unet_*`` and ``lora_te_*`` (SD 1.x/2.x), or SDXL's layout when
    ``sdxl_unet_names`` (the UNet's ldm module names) is given: ``lora_unet_input_blocks_*``...,
    ``lora_te1_*`` and ``lora_te2_*`` (diffusers' converter names the first encoder ``lora_te1_``)."""
    sdxl = sdxl_unet_names is not None
    if text_encoder_2 is not None and not sdxl:
        raise ConfigError("adapters on a second text encoder (text_encoder_2) are SDXL's: pass sdxl_unet_names")
    kohya: dict[str, torch.Tensor] = {}
    for part, weights in (("unet", unet), ("text_encoder", text_encoder), ("text_encoder_2", text_encoder_2)):
        if weights is None:
            continue
        state = weights.state if part == "unet" else canonical_text_encoder_keys(weights.state)
        if part == "unet" and sdxl_unet_names is not None:
            state = renamed_modules(state, sdxl_unet_names)
        converted = convert_state_dict_to_kohya({f"{part}.{k}": v for k, v in state.items()})
        alpha = float(weights.settings.alpha)
        for key, value in converted.items():
            if part == "text_encoder" and not sdxl:
                key = key.replace("lora_te1_", "lora_te_", 1)  # SD 1.x/2.x's single encoder
            kohya[key] = torch.tensor(alpha) if key.endswith(".alpha") else value.contiguous()
    return kohya


def save_kohya_lora(
    path: str | Path,
    unet: AdapterWeights | None,
    text_encoder: AdapterWeights | None,
    text_encoder_2: AdapterWeights | None = None,
    sdxl_unet_names: ModuleNames | None = None,
) -> Path:
    """Write the adapters as one kohya-layout ``.safetensors`` file (SDXL's with ``sdxl_unet_names``)."""
    main = unet or text_encoder or text_encoder_2
    assert main is not None, "nothing to save"
    metadata = {"ss_network_module": "networks.lora", "ss_network_dim": str(main.settings.rank),
                "ss_network_alpha": str(main.settings.alpha),
                "ss_network_train_unet_only": str(text_encoder is None and text_encoder_2 is None)}  # fmt: skip
    if sdxl_unet_names is not None:
        metadata["ss_base_model_version"] = "sdxl_base_v1-0"  # what kohya's sd-scripts writes for SDXL
    save_file(kohya_state_dict(unet, text_encoder, text_encoder_2, sdxl_unet_names), str(path), metadata=metadata)
    return Path(path)


def save_lycoris(
    path: str | Path,
    unet: AdapterWeights | None,
    text_encoder: AdapterWeights | None,
    text_encoder_2: AdapterWeights | None = None,
    sdxl_unet_names: ModuleNames | None = None,
) -> Path:
    """Write LoHa/LoKr adapters as one LyCORIS file (kohya names, SDXL's with ``sdxl_unet_names``: ldm-named
    UNet modules, ``lora_te1_``/``lora_te2_``; A1111, ComfyUI and ``lf-sample lora=`` read it)."""
    state: dict[str, torch.Tensor] = {}
    for part, weights in (("unet", unet), ("text_encoder", text_encoder), ("text_encoder_2", text_encoder_2)):
        if weights is not None:
            state |= to_lycoris_file(part, weights.state, weights.settings, sdxl_unet_names)
    main = unet or text_encoder or text_encoder_2
    assert main is not None, "nothing to save"
    metadata = {"ss_network_module": "lycoris.kohya", "ss_network_args": json.dumps({"algo": main.settings.kind}),
                "ss_network_dim": str(main.settings.rank), "ss_network_alpha": str(main.settings.alpha)}  # fmt: skip
    save_file(state, str(path), metadata=metadata)
    return Path(path)


def save_lora_files(
    folder: str | Path,
    unet: AdapterWeights | None,
    text_encoder: AdapterWeights | None = None,
    text_encoder_2: AdapterWeights | None = None,
    sdxl_unet_names: ModuleNames | None = None,
) -> None:
    """``folder/pytorch_lora_weights.safetensors`` (diffusers) and ``folder/lora_kohya.safetensors`` (SDXL's
    kohya layout with ``sdxl_unet_names``, see :func:`kohya_state_dict`); LoHa and LoKr adapters (which
    diffusers' LoRA format cannot hold) as ``folder/lora_lycoris.safetensors`` (kohya names; SDXL's with
    ``sdxl_unet_names``, as its LoRA file).

    Raises:
        ConfigError: adapters of different kinds (LoRA and LoHa/LoKr) in one model: no file holds both.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    main = unet or text_encoder or text_encoder_2
    assert main is not None, "nothing to save"
    kinds = {w.settings.kind for w in (unet, text_encoder, text_encoder_2) if w is not None}
    if len(kinds) > 1:
        raise ConfigError(f"{folder}: adapters of kinds {sorted(kinds)} in one model; no LoRA file holds both")
    if main.settings.kind != "lora":
        save_lycoris(folder / LYCORIS_FILE, unet, text_encoder, text_encoder_2, sdxl_unet_names)
        return
    save_diffusers_lora(folder, unet, text_encoder, text_encoder_2)
    save_kohya_lora(folder / KOHYA_LORA_FILE, unet, text_encoder, text_encoder_2, sdxl_unet_names)
