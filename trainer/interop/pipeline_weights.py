"""Pipeline parts (UNet, VAE, CLIP text encoders: SDXL has two) to and from a single file or a diffusers folder,
strictly.

Writing: :func:`save_single_file` renames the parts' weights with the key map of
:mod:`trainer.interop.sd_single_file` and writes one ``.safetensors`` (atomically) with metadata.

Reading: :func:`load_original_state` (a single file, after :mod:`trainer.interop.layouts`) and
:func:`load_diffusers_folder` load parts built from their configs, after checking that the weights
hold exactly the keys and shapes the configs imply (a
:class:`~trainer.interop.sd_single_file.KeyMapError` lists every missing, unexpected and
misshapen key), with ``strict=True``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from lf_common.atomic import atomic_path
from lf_common.errors import ConfigError, DataError
from trainer.interop.safe_load import PICKLE_SUFFIXES, read_weights, refuse_non_floating
from trainer.interop.sd_single_file import (
    SDXL_OPEN_CLIP_PREFIX,
    SDXL_TEXT_PREFIX,
    TEXT_LAYOUTS,
    UNET_PREFIX,
    VAE_PREFIX,
    check_state_dict,
    to_diffusers,
    to_original,
    unet_rules,
    vae_rules,
)
from trainer.interop.sd_text_encoder_keys import (
    PROJECTION,
    open_clip_to_text,
    text_to_diffusers,
    text_to_open_clip,
    text_to_original,
)

METADATA_PREFIX = "latentforge."
VARIANTS = ("fp16", "bf16")
PARTS = ("unet", "vae", "text_encoder")
SDXL_PART = "text_encoder_2"  # SDXL's second text encoder (OpenCLIP ViT-bigG with its pooled projection)


@dataclass
class PipelineParts:
    """The networks of an SD pipeline; ``text_encoder_2`` only in SDXL's."""

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    text_encoder_2: CLIPTextModelWithProjection | None = None

    def networks(self) -> dict[str, torch.nn.Module]:
        """The parts there are, by their diffusers folder name."""
        named = {"unet": self.unet, "vae": self.vae, "text_encoder": self.text_encoder}
        return named | ({SDXL_PART: self.text_encoder_2} if self.text_encoder_2 is not None else {})


def text_layout_for(parts: PipelineParts, text_layout: str = "auto") -> str:
    """``"sd1"`` (CLIP under ``cond_stage_model.transformer``), ``"sd2"`` (OpenCLIP under
    ``cond_stage_model.model``) or ``"sdxl"`` (both, under ``conditioner.embedders.0/1``); ``"auto"``:
    SDXL's with a second text encoder, else SD 2.x's when the text encoder is OpenCLIP's (GELU; OpenAI's
    CLIP of SD 1.x uses quick GELU).

    Raises:
        ConfigError: an unknown layout, or ``"sdxl"`` without (or ``"sd1"``/``"sd2"`` with) a second encoder.
    """
    if text_layout == "auto":
        if parts.text_encoder_2 is not None:
            return "sdxl"
        return "sd2" if parts.text_encoder.config.hidden_act == "gelu" else "sd1"
    if text_layout not in TEXT_LAYOUTS:
        raise ConfigError(f"text_layout={text_layout!r}: expected 'auto' or one of {list(TEXT_LAYOUTS)}")
    if (text_layout == "sdxl") != (parts.text_encoder_2 is not None):
        raise ConfigError(f"text_layout={text_layout!r}: SDXL's layout is for SDXL models (two text encoders) only")
    return text_layout


def original_state_dict(parts: PipelineParts, text_layout: str = "sd1") -> dict[str, torch.Tensor]:
    """All weights of ``parts`` in the original single-file layout (text encoders in ``text_layout``)."""
    state = to_original(parts.unet.state_dict(), unet_rules(parts.unet.config), UNET_PREFIX)
    state |= to_original(parts.vae.state_dict(), vae_rules(parts.vae.config), VAE_PREFIX)
    text = parts.text_encoder.state_dict()
    if text_layout == "sdxl":
        state |= text_to_original(text, SDXL_TEXT_PREFIX)
        state |= text_to_open_clip(_second_encoder(parts).state_dict(), SDXL_OPEN_CLIP_PREFIX)
    else:
        state |= text_to_open_clip(text) if text_layout == "sd2" else text_to_original(text)
    return state


def _second_encoder(parts: PipelineParts) -> CLIPTextModelWithProjection:
    if parts.text_encoder_2 is None:
        raise ConfigError("the SDXL layout needs SDXL's second text encoder (text_encoder_2); these parts have none")
    return parts.text_encoder_2


def save_single_file(
    parts: PipelineParts,
    path: str | Path,
    dtype: torch.dtype | None = None,
    metadata: dict[str, str] | None = None,
    text_layout: str = "auto",
    extra: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write ``parts`` as one ``.safetensors`` in the original layout (complete or absent).

    Args:
        dtype: cast floating-point weights to it (``torch.float16`` halves the file); ``None`` keeps theirs.
        metadata: strings stored in the safetensors header (the training config, the step...).
        text_layout: ``"sd1"``, ``"sd2"`` or ``"auto"`` (see :func:`text_layout_for`).
        extra: tensors written beside the parts' under their own keys (ComfyUI's ``v_pred`` marker, what
            ``lf-import`` set aside); none may be a key of the parts.

    Raises:
        DataError: not a ``.safetensors`` path, or an ``extra`` key that the parts' weights already hold.
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise DataError(f"{path}: a single-file export must end in .safetensors")
    state = original_state_dict(parts, text_layout_for(parts, text_layout))
    if clash := sorted(set(extra or {}) & set(state)):
        raise DataError(f"{path}: the extra tensors {clash} are weights of the model already; not written twice")
    state = {
        key: (tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor).contiguous()
        for key, tensor in {**state, **(extra or {})}.items()
    }
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata={"format": "pt", **(metadata or {})})
    return path


def folder_configs(config_dir: str | Path) -> dict[str, dict[str, Any]]:
    """The ``unet``, ``vae`` and ``text_encoder`` (and, in an SDXL folder, ``text_encoder_2``) configs of a
    diffusers pipeline folder.

    Raises:
        DataError: a part's ``config.json`` is missing.
    """
    config_dir = Path(config_dir)
    for part in PARTS:
        if not (config_dir / part / "config.json").is_file():
            raise DataError(
                f"{config_dir}: {part}/config.json is missing; config_dir must be a diffusers pipeline folder"
            )
    configs = {
        "unet": dict(UNet2DConditionModel.load_config(config_dir / "unet")),
        "vae": dict(AutoencoderKL.load_config(config_dir / "vae")),
        "text_encoder": CLIPTextConfig.from_pretrained(config_dir / "text_encoder").to_dict(),
    }
    if (config_dir / SDXL_PART / "config.json").is_file():
        configs[SDXL_PART] = CLIPTextConfig.from_pretrained(config_dir / SDXL_PART).to_dict()
    return configs


def build_parts(configs: dict[str, dict[str, Any]]) -> PipelineParts:
    """Freshly initialised parts from their configs (``{"unet": ..., "vae": ..., "text_encoder": ...}``,
    and ``"text_encoder_2"`` for SDXL)."""
    second = configs.get(SDXL_PART)
    return PipelineParts(
        unet=UNet2DConditionModel.from_config(configs["unet"]),
        vae=AutoencoderKL.from_config(configs["vae"]),
        text_encoder=CLIPTextModel(CLIPTextConfig(**configs["text_encoder"])),
        text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**second)) if second else None,
    )


def parts_from_configs(config_dir: str | Path) -> PipelineParts:
    """Freshly initialised parts from a diffusers folder's ``unet/``, ``vae/``, ``text_encoder/`` configs."""
    return build_parts(folder_configs(config_dir))


def part_configs(parts: PipelineParts) -> dict[str, dict[str, Any]]:
    """The configs that rebuild ``parts`` (JSON-ready; diffusers' private ``_`` entries dropped)."""
    configs = {
        "unet": {k: v for k, v in parts.unet.config.items() if not k.startswith("_")},
        "vae": {k: v for k, v in parts.vae.config.items() if not k.startswith("_")},
        "text_encoder": parts.text_encoder.config.to_diff_dict(),
    }
    if parts.text_encoder_2 is not None:
        configs[SDXL_PART] = parts.text_encoder_2.config.to_diff_dict()
    return configs


def load_original_state(parts: PipelineParts, state: dict[str, torch.Tensor], source: str, text_layout: str) -> None:
    """Load a single file's weights, in the canonical layout (:mod:`trainer.interop.layouts`), into ``parts``.

    Every key must map to a weight of the parts, and every weight must be in ``state`` with the
    shape its config gives.

    Raises:
        KeyMapError: missing, unexpected or misshapen keys (all named, with ``source``).
    """
    check_state_dict(state, original_state_dict(parts, text_layout), source)
    parts.unet.load_state_dict(to_diffusers(state, unet_rules(parts.unet.config), UNET_PREFIX), strict=True)
    parts.vae.load_state_dict(to_diffusers(state, vae_rules(parts.vae.config), VAE_PREFIX), strict=True)
    if text_layout == "sdxl":
        parts.text_encoder.load_state_dict(text_to_diffusers(state, SDXL_TEXT_PREFIX), strict=True)
        second = open_clip_to_text(state, SDXL_OPEN_CLIP_PREFIX)
        second = {key if key == PROJECTION else "text_model." + key: tensor for key, tensor in second.items()}
        _second_encoder(parts).load_state_dict(second, strict=True)  # its modules sit under text_model.
        return
    text = open_clip_to_text(state) if text_layout == "sd2" else text_to_diffusers(state)
    parts.text_encoder.load_state_dict(text, strict=True)


def _folder_weights(folder: Path, allow_pickle: bool) -> dict[str, torch.Tensor]:
    """All tensors of one part's folder (``*.safetensors``, sharded or not; pickles only when allowed)."""
    files = sorted(folder.glob("*.safetensors"))
    full = [f for f in files if not any(f".{variant}." in f.name for variant in VARIANTS)]
    files = full or files  # diffusion_pytorch_model.safetensors over its .fp16. variant
    if not files:
        pickles = sorted(p for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES) if folder.is_dir() else []
        if not pickles:
            raise DataError(f"{folder}: no weights (*.safetensors) found")
        files = pickles
    state: dict[str, torch.Tensor] = {}
    for file in files:
        state |= read_weights(file, allow_pickle=allow_pickle)[0]
    return state


def load_part(network: torch.nn.Module, folder: str | Path, allow_pickle: bool = False) -> torch.nn.Module:
    """Load one part's folder (``unet/``, ``vae/``, ``text_encoder/``) into ``network``, strictly."""
    folder = Path(folder)
    state = _folder_weights(folder, allow_pickle)
    if isinstance(network, CLIPTextModel):
        state = {key.removeprefix("text_model."): tensor for key, tensor in state.items()}
        state.pop("embeddings.position_ids", None)
    elif isinstance(network, CLIPTextModelWithProjection):  # keeps its text_model. level (transformers 5)
        state.pop("text_model.embeddings.position_ids", None)
    expected = network.state_dict()
    check_state_dict(state, expected, str(folder))
    refuse_non_floating({key: t for key, t in state.items() if expected[key].is_floating_point()}, str(folder))
    network.load_state_dict(state, strict=True)
    return network


def load_diffusers_folder(folder: str | Path, allow_pickle: bool = False) -> PipelineParts:
    """Read a diffusers pipeline folder strictly (every key and shape checked against each part's config)."""
    folder = Path(folder)
    parts = parts_from_configs(folder)
    for name, network in parts.networks().items():
        load_part(network, folder / name, allow_pickle)
    return parts


def read_metadata(path: str | Path) -> dict[str, object]:
    """The ``latentforge.*`` metadata of a single file we wrote (JSON values decoded)."""
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
    out: dict[str, object] = {}
    for key, value in metadata.items():
        if key.startswith(METADATA_PREFIX):
            try:
                out[key[len(METADATA_PREFIX) :]] = json.loads(value)
            except json.JSONDecodeError:
                out[key[len(METADATA_PREFIX) :]] = value
    return out


def metadata_strings(info: dict[str, object]) -> dict[str, str]:
    """``info`` as safetensors metadata: ``latentforge.<key>`` -> JSON text."""
    return {METADATA_PREFIX + key: json.dumps(value, default=str) for key, value in info.items()}
