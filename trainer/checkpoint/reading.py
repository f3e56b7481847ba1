"""Reading a training checkpoint: a Lightning ``.ckpt`` file or a DeepSpeed folder (ZeRO shards
consolidated), and rebuilding its UNet and text encoder with the raw or EMA weights.

Used by export, the sampler (``Sampler.from_checkpoint``) and the tests; imports nothing of the
Lightning layer (modules, callbacks).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Literal

import torch
from diffusers import UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTextModelWithProjection

from lf_common.errors import ConfigError, DataError
from trainer.checkpoint.keys import CHECKPOINT_KEY, EMA_STATE_KEY, RAW_STATE_KEY, TEXT_ENCODER_KEYS
from trainer.interop.safe_load import IMPORT_FIX, load_torch_file
from trainer.lora.adapters import LoraSettings, add_lora

UNET_PREFIX = "unet."
TEXT_ENCODER_PREFIX = "text_encoder."
TEXT_ENCODER_2_PREFIX = "text_encoder_2."  # SDXL's second encoder, when DreamBooth trained it
Weights = Literal["auto", "ema", "raw"]


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a Lightning checkpoint file (``weights_only=True``), or consolidate a DeepSpeed one.

    A DeepSpeed checkpoint is a folder; its ZeRO shards are merged into full fp32 weights with
    Lightning's ``convert_zero_checkpoint_to_fp32_state_dict`` (any world size). When the EMA
    callback saved its average (``EMA_STATE_KEY``, beside the raw weights in ``state_dict``), the
    result holds the EMA model in ``state_dict`` (:func:`ema_model_state`) and the raw weights in
    ``current_model_state``
    (older ``.ckpt`` files of Lightning's ``WeightAveraging`` have that layout on disk).

    Raises:
        DataError: the path does not exist or is not a training checkpoint of this project.
    """
    path = Path(path)
    if path.is_dir():
        from lightning.pytorch.utilities.deepspeed import convert_zero_checkpoint_to_fp32_state_dict

        with tempfile.TemporaryDirectory() as tmp:
            merged = Path(tmp) / "merged.ckpt"
            convert_zero_checkpoint_to_fp32_state_dict(str(path), str(merged))
            checkpoint = load_torch_file(merged)
        checkpoint.pop(RAW_STATE_KEY, None)  # a rank-local copy under ZeRO; the merged one is exact
        checkpoint["_deepspeed"] = True
    elif path.is_file():
        checkpoint = load_torch_file(path)
    else:
        raise DataError(
            f"{path}: checkpoint does not exist; give a .ckpt file lf-train wrote "
            "(<output_dir>/checkpoints/last.ckpt) or a DeepSpeed checkpoint folder"
        )
    if not isinstance(checkpoint, dict):
        raise DataError(
            f"{path}: holds a {type(checkpoint).__name__}, not a training checkpoint; {IMPORT_FIX.format(path=path)}"
        )
    if EMA_STATE_KEY in checkpoint:  # the EMA callback's average; state_dict holds the raw weights
        checkpoint[RAW_STATE_KEY] = checkpoint["state_dict"]
        checkpoint["state_dict"] = ema_model_state(checkpoint[RAW_STATE_KEY], checkpoint.pop(EMA_STATE_KEY))
    if CHECKPOINT_KEY not in checkpoint or "unet_config" not in checkpoint[CHECKPOINT_KEY]:
        raise DataError(
            f"{path}: key '{CHECKPOINT_KEY}.unet_config' is missing: not a checkpoint lf-train wrote; "
            + IMPORT_FIX.format(path=path)
        )
    return checkpoint


def ema_model_state(raw: dict[str, torch.Tensor], averaged: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The EMA model's weights: the average where the EMA callback kept one (the parameters that trained), the raw
    weights elsewhere (frozen ones, which the average would equal), in ``raw``'s order. A checkpoint of the earlier
    full-module EMA averages every key."""
    return {**raw, **averaged}


def unet_state_dict(checkpoint: dict[str, Any], weights: Weights = "auto") -> tuple[dict[str, torch.Tensor], str]:
    """The UNet weights of a checkpoint and which kind they are.

    With the EMA callback, ``state_dict`` holds the EMA weights and ``current_model_state`` the
    raw ones; without it, ``state_dict`` holds the raw weights.

    Returns:
        ``(state_dict without the "unet." prefix, "ema" or "raw")``.

    Raises:
        DataError: ``weights="ema"`` but the checkpoint has no EMA weights.
    """
    has_ema = RAW_STATE_KEY in checkpoint
    if weights == "ema" and not has_ema:
        raise DataError("weights=ema: this checkpoint holds no EMA weights (train with callbacks.ema enabled)")
    if weights not in ("auto", "ema", "raw"):
        raise ConfigError(f"weights={weights!r}: expected 'auto', 'ema' or 'raw'")
    kind = "ema" if has_ema and weights in ("auto", "ema") else "raw"
    return part_state_dict(checkpoint, UNET_PREFIX, kind), kind


def part_state_dict(checkpoint: dict[str, Any], prefix: str, kind: str) -> dict[str, torch.Tensor]:
    """The weights under ``prefix`` (``"unet."``, ``"text_encoder."``), EMA or raw, prefix removed."""
    source = checkpoint[RAW_STATE_KEY] if kind == "raw" and RAW_STATE_KEY in checkpoint else checkpoint["state_dict"]
    return {k[len(prefix) :]: v for k, v in source.items() if k.startswith(prefix)}


def build_unet(checkpoint: dict[str, Any], weights: Weights = "auto") -> tuple[UNet2DConditionModel, str]:
    """Rebuild the UNet from the checkpoint's stored config and load its weights strictly."""
    unet = UNet2DConditionModel.from_config(checkpoint[CHECKPOINT_KEY]["unet_config"])
    if lora := checkpoint[CHECKPOINT_KEY].get("lora"):
        add_lora(unet, LoraSettings(**lora))  # the checkpoint holds base + adapter weights
    state, kind = unet_state_dict(checkpoint, weights)
    unet.load_state_dict(state, strict=True)
    return unet, kind


def build_text_encoder(
    checkpoint: dict[str, Any], text_dir: str, kind: str, second: bool = False
) -> CLIPTextModel | CLIPTextModelWithProjection:
    """The text encoder at ``text_dir``, with the weights DreamBooth trained (and its LoRA adapters) if any, or the
    adapters pivotal tuning trained on the base encoder (held where the record's ``text_encoder_keys`` says);
    ``second``: SDXL's second encoder (``text_encoder_2.*`` weights, ``text_encoder_2_lora`` adapters)."""
    cls, prefix, part = (
        (CLIPTextModelWithProjection, TEXT_ENCODER_2_PREFIX, "text_encoder_2")
        if second
        else (CLIPTextModel, TEXT_ENCODER_PREFIX, "text_encoder")
    )
    record = checkpoint[CHECKPOINT_KEY]
    text_encoder = cls.from_pretrained(text_dir, local_files_only=True)
    if lora := record.get(f"{part}_lora"):
        add_lora(text_encoder, LoraSettings(**lora))
    held_at = record.get(TEXT_ENCODER_KEYS, {}).get(part)
    if trained_text := part_state_dict(checkpoint, prefix, kind):
        text_encoder.load_state_dict(trained_text, strict=True)
    elif lora and held_at:
        load_adapter_weights(text_encoder, part_state_dict(checkpoint, held_at, kind), held_at)
    return text_encoder


def load_adapter_weights(model: torch.nn.Module, state: dict[str, torch.Tensor], held_at: str) -> None:
    """Load ``model``'s adapter weights (its trainable parameters after :func:`add_lora`) from ``state``, the rest
    of ``model`` as it is; every adapter weight must be in ``state``.

    Raises:
        DataError: an adapter weight the checkpoint lacks.
    """
    names = [name for name, param in model.named_parameters() if param.requires_grad]  # add_lora froze the rest
    missing = [name for name in names if name not in state]
    if missing or not names:
        raise DataError(
            f"the checkpoint's text-encoder adapters under {held_at!r} lack {missing[:3]} ({len(missing)} of "
            f"{len(names)}): not the checkpoint of the run whose record names them"
        )
    full = model.state_dict() | {name: state[name] for name in names}
    model.load_state_dict(full, strict=True)
