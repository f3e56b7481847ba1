"""LoRA files users bring, applied to a UNet and text encoder: for sampling (``lf-sample lora=PATH
lora_scale=S``) and as the trainable start of further training (``model.lora_from=PATH``).

Kinds, each mapped exactly or refused by name:

* diffusers / PEFT LoRA (``pytorch_lora_weights.safetensors``, rank/alpha in its metadata) and kohya
  LoRA including convolutions (LoCon; ``lora_unet_*``, ``lora_te_*`` with ``.alpha``; SDXL's
  ``lora_te1_*``/``lora_te2_*`` and ldm-named UNet modules, ``lora_unet_input_blocks_*``): read with
  diffusers' own ``lora_state_dict`` (given the UNet's config, which maps ldm block numbers) and
  loaded with its loaders, as ``pipe.load_lora_weights`` does;
* LyCORIS LoHa and LoKr (``.hada_*``, ``.lokr_*``; SDXL's with ldm-named UNet modules and
  ``lora_te1_``/``lora_te2_``): through peft's LoHa/LoKr layers (:mod:`trainer.interop.lycoris`);
* other LyCORIS algorithms and model checkpoints are refused, naming what the file is.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from diffusers.loaders.lora_base import set_adapters_for_text_encoder
from safetensors.torch import load_file
from transformers import CLIPTextModel, CLIPTextModelWithProjection

from lf_common.errors import DataError
from lf_common.object_cache import local_path
from trainer.diffusion.unet_kinds import is_sdxl_unet
from trainer.interop.embedding_files import BUNDLE_PREFIX
from trainer.interop.lora_formats import DIFFUSERS_LORA_FILE, LYCORIS_FILE
from trainer.interop.lycoris import ModuleNames, adapter_weights, add_lycoris, lycoris_kind, split_by_part
from trainer.lora.adapters import LoraSettings, mark_adapters_trainable

log = logging.getLogger(__name__)
PARTS = ("unet", "text_encoder", "text_encoder_2")
MODEL_PREFIXES = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.", "conditioner.")


def lora_file(path: str | Path) -> tuple[Path, str]:
    """The folder and name of a LoRA file (``path`` itself, or ``path/pytorch_lora_weights.safetensors``).

    Raises:
        DataError: no such file, or not a ``.safetensors`` (LoRA pickles are not read).
    """
    path = Path(path)
    folder, weight_name = (path.parent, path.name) if path.is_file() else (path, DIFFUSERS_LORA_FILE)
    if path.is_dir() and not (folder / weight_name).is_file() and (folder / LYCORIS_FILE).is_file():
        weight_name = LYCORIS_FILE  # an export of LoHa/LoKr adapters
    if not (folder / weight_name).is_file():
        raise DataError(
            f"lora={path}: no LoRA file there (expected a .safetensors file or a folder with {DIFFUSERS_LORA_FILE})"
        )
    if not weight_name.endswith(".safetensors"):
        raise DataError(f"lora={path}: LoRA files are read as .safetensors only (a pickle can run code); convert it")
    return folder, weight_name


def _settings_of(model: torch.nn.Module, adapter_name: str) -> LoraSettings:
    """The settings of a LoRA adapter diffusers built (what rebuilds it from a checkpoint)."""
    config = model.peft_config[adapter_name]
    return LoraSettings(
        rank=config.r,
        alpha=config.lora_alpha,
        target_modules=sorted(config.target_modules),
        rank_pattern=dict(config.rank_pattern or {}),
        alpha_pattern=dict(config.alpha_pattern or {}),
    )


def _load_lycoris(
    kind: str,
    state: dict[str, torch.Tensor],
    models: dict[str, torch.nn.Module],
    adapter_name: str,
    unet_names: ModuleNames | None,
) -> dict[str, LoraSettings]:
    sdxl = "unet" in models and is_sdxl_unet(models["unet"].config)
    if sdxl and unet_names is None:
        raise DataError("an SDXL UNet's LyCORIS file names its modules as ldm does: pass unet_names "
                        "(trainer.interop.lora_formats.sdxl_lora_names(unet))")  # fmt: skip
    settings = {}
    for part, modules in split_by_part(state, models, unet_names if sdxl else None).items():
        settings[part], weights = adapter_weights(kind, modules, models[part])
        add_lycoris(models[part], settings[part], weights, adapter_name)
    return settings


# diffusers' kohya converter names a text encoder's attention adapters the old way (``self_attn.to_q_lora.down``)
# and its MLP ones the new way (``mlp.fc1.lora_linear_layer.down``); its text-encoder loader then infers one
# naming per file (old only when ``to_out_lora`` is among the keys) and drops the other's adapters with a
# warning. Naming all of them the new way keeps every adapter.
OLD_TEXT_ATTENTION = {f".to_{x}_lora.": f".{x}_proj.lora_linear_layer." for x in ("q", "k", "v", "out")}


def uniform_text_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Text-encoder adapter keys of diffusers' kohya conversion, all in diffusers' current naming."""
    out = {}
    for key, tensor in state.items():
        if key.startswith(PARTS[1:]):
            for old, new in OLD_TEXT_ATTENTION.items():
                key = key.replace(old, new)
        out[key] = tensor
    return out


def _load_lora(path: Path, models: dict[str, torch.nn.Module], adapter_name: str) -> dict[str, LoraSettings]:
    folder, weight_name = lora_file(path)
    unet_config = models["unet"].config if "unet" in models else None  # maps SDXL kohya files' ldm block numbers
    raw = load_file(str(folder / weight_name))
    if any(key.startswith(BUNDLE_PREFIX) for key in raw):  # pivotal tuning's embeddings: lf-sample adds them apart
        state, alphas, metadata = StableDiffusionPipeline.lora_state_dict(
            {k: v for k, v in raw.items() if not k.startswith(BUNDLE_PREFIX)}, unet_config=unet_config,
            return_lora_metadata=True,
        )  # fmt: skip
    else:
        state, alphas, metadata = StableDiffusionPipeline.lora_state_dict(
            str(folder), weight_name=weight_name, local_files_only=True, return_lora_metadata=True,
            unet_config=unet_config,
        )  # fmt: skip
    state = uniform_text_names(state)
    parts = [part for part in PARTS if any(key.startswith(part + ".") for key in state) and part in models]
    if not parts:
        raise DataError(f"lora={path}: holds no UNet or text-encoder adapter weights (keys like {sorted(state)[:3]})")
    if "unet" in parts:
        models["unet"].load_lora_adapter(
            state, prefix="unet", network_alphas=alphas, adapter_name=adapter_name, metadata=metadata
        )
    for part in parts:
        if part != "unet":
            StableDiffusionPipeline.load_lora_into_text_encoder(
                state, alphas, models[part], prefix=part, adapter_name=adapter_name, metadata=metadata
            )
    return {part: _settings_of(models[part], adapter_name) for part in parts}


def add_adapters_from_file(
    path: str | Path,
    models: dict[str, torch.nn.Module],
    adapter_name: str = "lora",
    unet_names: ModuleNames | None = None,
) -> dict[str, LoraSettings]:
    """Add the adapters of the file at ``path`` to ``models`` (``{"unet": ..., "text_encoder": ...}``, and
    SDXL's ``"text_encoder_2"``). ``unet_names``: an SDXL UNet's modules' ldm names, which its LyCORIS
    files use (:func:`trainer.interop.lora_formats.sdxl_lora_names`; LoRA files need none).

    Returns:
        Per part that received adapters, the settings that rebuild them.

    Raises:
        DataError: no such file, a refused kind (named), or weights that do not fit the models.
    """
    folder, weight_name = lora_file(path)
    state = load_file(str(folder / weight_name))
    state = {k: v for k, v in state.items() if not k.startswith(BUNDLE_PREFIX)}  # embeddings: load_lora_file's
    if any(key.startswith(MODEL_PREFIXES) for key in state):
        raise DataError(f"lora={path}: a model checkpoint, not a LoRA (import it with lf-import pretrained=FILE)")
    try:
        kind = lycoris_kind(state)
    except DataError as error:
        raise DataError(f"lora={path}: {error}") from None
    if kind is None:
        return _load_lora(Path(path), models, adapter_name)
    try:
        return _load_lycoris(kind, state, models, adapter_name, unet_names)
    except DataError as error:
        raise DataError(f"lora={path}: {error}") from None


def load_lora(
    unet: UNet2DConditionModel,
    text_encoder: CLIPTextModel,
    path: str | Path,
    scale: float = 1.0,
    adapter_name: str = "lora",
    text_encoder_2: CLIPTextModelWithProjection | None = None,
    unet_names: ModuleNames | None = None,
) -> list[str]:
    """Add the LoRA at ``path`` to the UNet and, when the file has text-encoder adapters, to the text
    encoder(s) (SDXL's second one given as ``text_encoder_2``); set its scale (1: as trained, 0: off).
    ``unet_names``: see :func:`add_adapters_from_file`.

    Returns:
        The parts that received adapters, of ``["unet", "text_encoder", "text_encoder_2"]``.

    Raises:
        DataError: no such file, a refused kind, or it holds no adapter weights for any part.
    """
    models = {"unet": unet, "text_encoder": text_encoder}
    if text_encoder_2 is not None:
        models["text_encoder_2"] = text_encoder_2
    parts = list(add_adapters_from_file(path, models, adapter_name, unet_names))
    for part in parts:
        if part == "unet":
            unet.set_adapters([adapter_name], weights=[scale])
        else:
            set_adapters_for_text_encoder([adapter_name], models[part], [scale])
    return parts


def trainable_adapters_from_file(
    unet: UNet2DConditionModel, path: str | Path, unet_names: ModuleNames | None = None
) -> LoraSettings:
    """The UNet adapters of the file at ``path`` (or a URL: downloaded once to the download cache) as the
    trainable adapter ``"default"`` (continue training a LoRA; ``unet_names``: see :func:`add_adapters_from_file`).

    The base UNet is frozen. Text-encoder adapters in the file are not used: training from latent
    shards takes text embeddings precomputed without them (logged).

    Returns:
        The settings that rebuild the adapter (stored in checkpoints as ``model.lora``).
    """
    settings = add_adapters_from_file(local_path(path), {"unet": unet}, "default", unet_names)  # a URL: its cached copy
    if "unet" not in settings:
        raise DataError(f"model.lora_from={path}: the file holds no UNet adapters to train on")
    trainable = mark_adapters_trainable(unet, "default")
    log.info("model.lora_from=%s: %s adapters on %d modules, %d trainable parameters", path,
             settings["unet"].kind, len(settings["unet"].target_modules), trainable)  # fmt: skip
    return settings["unet"]
