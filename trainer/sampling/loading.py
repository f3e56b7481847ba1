"""The sampler's parts from an export folder (diffusers pipeline layout) or a training checkpoint."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from data_pipelines.latents.encoders import resolve_device
from data_pipelines.latents.text_encoding import TextEncoding
from lf_common.errors import DataError
from trainer.checkpoint.export import EMBEDDINGS_DIR, EMBEDDINGS_INFO, EXPORT_INFO_NAME, build_export
from trainer.diffusion.unet_kinds import is_sdxl_unet
from trainer.interop.embedding_files import add_embedding, bundled_embeddings, read_embedding_file
from trainer.interop.lora_formats import sdxl_lora_names
from trainer.interop.lora_loading import load_lora, lora_file


def export_parts(folder: Path, device: str = "auto", dtype: str = "float32") -> dict[str, Any]:
    """The keyword arguments of :class:`~trainer.sampling.sampler.Sampler` for an export folder.

    A textual-inversion export's ``embeddings/*.safetensors`` are added to the tokenizers and encoders.
    SDXL (``text_encoder_2/`` present) adds the second encoder and tokenizer and the pipeline's
    ``force_zeros_for_empty_prompt`` (``model_index.json``; true when absent, as diffusers' default).
    The prompts are encoded as the training captions were (long prompts, ``clip_skip``): the latent manifest
    recorded in the export's ``latentforge.json`` says how (the defaults for a folder without one).

    Raises:
        DataError: the folder is not a pipeline folder.
    """
    if not (folder / "model_index.json").is_file():
        raise DataError(f"{folder}: not an export folder (model_index.json is missing)")
    torch_device, torch_dtype = resolve_device(device), getattr(torch, dtype)
    load = {"local_files_only": True}
    unet = UNet2DConditionModel.from_pretrained(folder / "unet", torch_dtype=torch_dtype, **load)
    vae = AutoencoderKL.from_pretrained(folder / "vae", torch_dtype=torch_dtype, **load)
    text_encoder = CLIPTextModel.from_pretrained(folder / "text_encoder", dtype=torch_dtype, **load)
    parts: dict[str, Any] = {
        "unet": unet.to(torch_device),
        "vae": vae.to(torch_device),
        "text_encoder": text_encoder.to(torch_device),
        "tokenizer": CLIPTokenizer.from_pretrained(folder / "tokenizer", **load),
        "scheduler_config": DDPMScheduler.load_config(folder / "scheduler", **load),
        "model_name": folder.name,
        "text_encoding": recorded_text_encoding(_export_info(folder).get("latent_manifest")),
    }
    if (folder / "text_encoder_2").is_dir():  # an SDXL export
        encoder_2 = CLIPTextModelWithProjection.from_pretrained(folder / "text_encoder_2", dtype=torch_dtype, **load)
        index = json.loads((folder / "model_index.json").read_text())
        parts.update(
            text_encoder_2=encoder_2.to(torch_device),
            tokenizer_2=CLIPTokenizer.from_pretrained(folder / "tokenizer_2", **load),
            force_zeros_for_empty_prompt=bool(index.get("force_zeros_for_empty_prompt", True)),
        )
    if (folder / EMBEDDINGS_DIR).is_dir():  # a textual-inversion export: its learned tokens
        load_embeddings(sorted((folder / EMBEDDINGS_DIR).glob("*.safetensors")), *_text_side(parts))
    return parts


def checkpoint_parts(
    ckpt_path: str | Path,
    weights: str = "auto",
    device: str = "auto",
    dtype: str = "float32",
    vae_path: str | None = None,
    text_encoder_path: str | None = None,
    tokenizer_path: str | None = None,
) -> dict[str, Any]:
    """The keyword arguments of :class:`~trainer.sampling.sampler.Sampler` for a Lightning ``.ckpt`` or
    DeepSpeed checkpoint folder (see :meth:`~trainer.sampling.sampler.Sampler.from_checkpoint`)."""
    pipe, info, _ = build_export(ckpt_path, weights, vae_path, text_encoder_path, tokenizer_path, dtype)
    embeddings = info.pop(EMBEDDINGS_INFO)
    torch_device = resolve_device(device)
    parts: dict[str, Any] = {
        "unet": pipe.unet.to(torch_device),
        "vae": pipe.vae.to(torch_device),
        "text_encoder": pipe.text_encoder.to(torch_device),
        "tokenizer": pipe.tokenizer,
        "scheduler_config": dict(pipe.scheduler.config),
        "model_name": f"{Path(ckpt_path).stem}-{info['weights']}",
        "text_encoding": recorded_text_encoding(info.get("latent_manifest")),
    }
    if is_sdxl_unet(pipe.unet.config):
        parts.update(
            text_encoder_2=pipe.text_encoder_2.to(torch_device),
            tokenizer_2=pipe.tokenizer_2,
            force_zeros_for_empty_prompt=bool(pipe.config.get("force_zeros_for_empty_prompt", True)),
        )
    for embedding in embeddings:  # a textual-inversion run's tokens
        add_embedding(embedding, *_text_side(parts))
    return parts


def _export_info(folder: Path) -> dict[str, Any]:
    """The export's ``latentforge.json`` (empty for a folder written by another tool)."""
    path = folder / EXPORT_INFO_NAME
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise DataError(f"{path}: not valid JSON ({error})") from error


def recorded_text_encoding(manifest: dict[str, Any] | None) -> TextEncoding:
    """How the training captions were encoded (``max_token_length``, ``clip_skip``), from a latent manifest's
    dict (its ``text_encoder.extra``); the defaults when there is none."""
    return TextEncoding.recorded(((manifest or {}).get("text_encoder") or {}).get("extra"))


def _text_side(parts: dict[str, Any]) -> tuple[list[CLIPTokenizer], list[torch.nn.Module]]:
    """The tokenizers and text encoders of a sampler's parts (SDXL: two each)."""
    second = "text_encoder_2" in parts
    tokenizers = [parts["tokenizer"], *([parts["tokenizer_2"]] if second else [])]
    return tokenizers, [parts["text_encoder"], *([parts["text_encoder_2"]] if second else [])]


def load_embeddings(
    paths: list[str | Path], tokenizers: list[CLIPTokenizer], text_encoders: list[torch.nn.Module]
) -> list[str]:
    """Add textual-inversion embedding files (``lf-sample embeddings=``; every layout
    :mod:`trainer.interop.embedding_files` reads) to the sampler's tokenizers and text encoders.

    Returns:
        The tokens a prompt can now use (each as its file's name or metadata says).

    Raises:
        DataError: a file that is no embedding, or does not fit the model.
    """
    tokens = []
    for path in paths:
        embedding = read_embedding_file(path)
        add_embedding(embedding, tokenizers, text_encoders)
        tokens.append(embedding.token)
    return tokens


def load_lora_file(
    path: str | Path,
    unet: UNet2DConditionModel,
    tokenizers: list[CLIPTokenizer],
    text_encoders: list[torch.nn.Module],
    scale: float = 1.0,
) -> list[str]:
    """Add a LoRA file (``lf-sample lora=``, any kind :mod:`trainer.interop.lora_loading` reads) to a sampler's
    parts: its adapters on the UNet and the text encoders (SDXL's two), at ``scale``, and the textual-inversion
    embeddings it bundles (pivotal tuning's ``bundle_emb.*``) in the tokenizers and encoders.

    Returns:
        The bundled tokens (none for a plain LoRA).

    Raises:
        DataError: no such file, a refused kind, or adapters or embeddings that do not fit the model.
    """
    from safetensors.torch import load_file

    folder, name = lora_file(path)
    tokens = []
    for embedding in bundled_embeddings(load_file(str(folder / name)), str(folder / name)):
        add_embedding(embedding, tokenizers, text_encoders)
        tokens.append(embedding.token)
    second = text_encoders[1] if len(text_encoders) > 1 else None
    load_lora(unet, text_encoders[0], path, scale, text_encoder_2=second, unet_names=sdxl_lora_names(unet))
    return tokens
