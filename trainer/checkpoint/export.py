"""Export a training checkpoint as a diffusers ``StableDiffusionPipeline`` folder.

A checkpoint of an SDXL UNet (``addition_embed_type: text_time``) exports as a
``StableDiffusionXLPipeline`` folder instead: ``text_encoder_2/`` and ``tokenizer_2/`` come from the
folders the latent-shard manifest names, like the first encoder's (``force_zeros_for_empty_prompt``:
an empty negative prompt is zeros, as SDXL's caption dropout trained it).

The folder holds ``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/`` and
``model_index.json`` (weights as safetensors), plus ``latentforge.json`` with the training config,
the step and which weights (EMA or raw) the UNet carries. A LoRA run exports the base UNet and its
adapters (and the text encoders', when DreamBooth trained them) in ``lora/``
(``pipe.load_lora_weights(folder / "lora")``, and a kohya-layout file: SDXL's, ldm-named UNet
modules and ``lora_te1_``/``lora_te2_``, for an SDXL model). A textual-inversion run exports the base
pipeline and its learned tokens in ``embeddings/`` (AUTOMATIC1111/ComfyUI and diffusers layouts,
:func:`~trainer.interop.embedding_files.save_embedding_files`). Both ``lf-sample`` and
``diffusers.StableDiffusionPipeline.from_pretrained`` load it.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
)
from transformers import CLIPTokenizer

from lf_common import object_store
from lf_common.atomic import atomic_path
from lf_common.errors import DataError
from lf_common.object_cache import model_folder
from trainer.checkpoint.keys import CHECKPOINT_KEY
from trainer.checkpoint.reading import Weights, build_text_encoder, build_unet, load_checkpoint, part_state_dict
from trainer.diffusion.unet_kinds import is_inpainting_unet, is_sdxl_unet
from trainer.interop.embedding_files import Embedding, bundle_into, save_embedding_files
from trainer.interop.lora_formats import KOHYA_LORA_FILE, LYCORIS_FILE, save_lora_files, sdxl_lora_names
from trainer.interop.prediction_type import prediction_markers
from trainer.interop.set_aside import SET_ASIDE_FILE, SET_ASIDE_LAYOUT, read_set_aside, set_aside_file
from trainer.lora.adapters import AdapterWeights, LoraSettings, adapter_state_dict, merge_adapters, remove_adapters

log = logging.getLogger(__name__)
EXPORT_INFO_NAME = "latentforge.json"
LORA_DIR = "lora"
SET_ASIDE_INFO = "set_aside_file"  # build_export's info: the base folder's set-aside file (not recorded)
EMBEDDINGS_INFO = "embeddings"  # build_export's info: a textual-inversion run's learned embeddings (not recorded)
EMBEDDINGS_DIR = "embeddings"  # in an export folder: the learned embeddings' files (lf-sample loads them)
TEXTUAL_INVERSION_KEY = "textual_inversion"  # a textual-inversion run's record: tokens and the rows' state keys


def learned_embeddings(checkpoint: dict[str, Any], kind: str) -> list[Embedding]:
    """A textual-inversion run's embeddings: each token's rows ``(N, D_i)`` per text encoder, from the state
    keys its record names (none for other runs)."""
    record = checkpoint[CHECKPOINT_KEY].get(TEXTUAL_INVERSION_KEY)
    if not record:
        return []
    state = part_state_dict(checkpoint, "", kind)
    rows = [state[key].float() for key in record["row_keys"]]  # per encoder (N_total, D_i)
    embeddings, start = [], 0
    for token, names in record["vector_tokens"].items():
        embeddings.append(Embedding(token, [r[start : start + len(names)] for r in rows]))
        start += len(names)
    return embeddings


def take_adapters(record: dict[str, Any], models: dict[str, torch.nn.Module], split: bool) -> dict[str, AdapterWeights]:
    """Remove the LoRA adapters from ``models`` (``{"unet": ..., "text_encoder": ...}``, SDXL's
    ``"text_encoder_2"``): returned apart with ``split``, else merged into the base weights.

    Returns:
        ``{"unet": AdapterWeights, "text_encoder": AdapterWeights, ...}`` for the parts that had adapters (split only).
    """
    adapters = {}
    for part, key in (
        ("unet", "lora"),
        ("text_encoder", "text_encoder_lora"),
        ("text_encoder_2", "text_encoder_2_lora"),
    ):
        if not (settings := record.get(key)):
            continue
        if split:
            adapters[part] = AdapterWeights(adapter_state_dict(models[part]), LoraSettings(**settings))
            remove_adapters(models[part])
        else:
            merge_adapters(models[part])
    return adapters


def build_export(
    ckpt_path: str | Path,
    weights: Weights = "auto",
    vae_path: str | None = None,
    text_encoder_path: str | None = None,
    tokenizer_path: str | None = None,
    dtype: str = "float32",
    split_lora: bool = False,
) -> tuple[StableDiffusionPipeline | StableDiffusionXLPipeline, dict[str, Any], dict[str, AdapterWeights]]:
    """The pipeline of a checkpoint, what to record about it (step, weights kind, training config), and
    for a LoRA run with ``split_lora`` its adapter weights per part (the pipeline then holds the base
    UNet and text encoder; without ``split_lora`` the adapters are merged into them).

    Args: as :func:`export_pipeline`.
    """
    checkpoint = load_checkpoint(ckpt_path)
    record = checkpoint[CHECKPOINT_KEY]
    manifest = record.get("latent_manifest", {})
    unet, kind = build_unet(checkpoint, weights)
    vae_dir = vae_path or manifest.get("vae", {}).get("path")
    text_dir = text_encoder_path or manifest.get("text_encoder", {}).get("path")
    tokenizer_dir = tokenizer_path or manifest.get("tokenizer_path")
    for name, value in (("vae_path", vae_dir), ("text_encoder_path", text_dir), ("tokenizer_path", tokenizer_dir)):
        if not value or not object_store.names_folder(value):
            raise DataError(f"{ckpt_path}: {name} {value!r} is not a folder; pass {name}=... to export")
    # the manifest of shards precomputed from a URL names the URL: loaded from its cached copy
    vae_dir, text_dir, tokenizer_dir = (model_folder(value) for value in (vae_dir, text_dir, tokenizer_dir))
    kept = set_aside_file(Path(text_dir).parent)  # what lf-import set aside beside the base folder, if any
    text_encoder = build_text_encoder(checkpoint, text_dir, kind)
    models = {"unet": unet, "text_encoder": text_encoder}
    if is_sdxl_unet(unet.config):
        models["text_encoder_2"] = build_text_encoder(checkpoint, _sdxl_folder(ckpt_path, record, "text_encoder_2"),
                                                      kind, second=True)  # fmt: skip
    adapters = take_adapters(record, models, split=split_lora)
    torch_dtype = getattr(torch, dtype)
    if is_sdxl_unet(unet.config):
        pipe = _sdxl_pipeline(ckpt_path, record, models, vae_dir, tokenizer_dir, torch_dtype)
    else:
        pipe = (StableDiffusionInpaintPipeline if is_inpainting_unet(unet.config) else StableDiffusionPipeline)(
            vae=AutoencoderKL.from_pretrained(vae_dir, local_files_only=True, torch_dtype=torch_dtype),
            text_encoder=text_encoder.to(torch_dtype),
            tokenizer=CLIPTokenizer.from_pretrained(tokenizer_dir, local_files_only=True),
            unet=unet.to(torch_dtype),
            scheduler=DDPMScheduler.from_config(record["noise_scheduler_config"]),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    info = {
        "checkpoint": str(Path(ckpt_path).resolve()),
        "global_step": record.get("global_step", checkpoint.get("global_step")),
        "weights": kind,
        "lora": record.get("lora"),
        "text_encoder_lora": record.get("text_encoder_lora"),
        "text_encoder_2_lora": record.get("text_encoder_2_lora"),
        "dtype": dtype,
        "train_config": record.get("train_config"),
        "latent_manifest": manifest,
        "datasets": record.get("datasets"),  # every latent-shard folder trained on (data=mixed: all of them)
        SET_ASIDE_INFO: str(kept) if kept else None,
        EMBEDDINGS_INFO: learned_embeddings(checkpoint, kind),
    }
    if TEXTUAL_INVERSION_KEY in record:
        info[TEXTUAL_INVERSION_KEY] = record[TEXTUAL_INVERSION_KEY]["settings"]
    return pipe, info, adapters


def _sdxl_folder(ckpt_path: str | Path, record: dict[str, Any], name: str) -> str:
    """The ``text_encoder_2`` or ``tokenizer_2`` folder the checkpoint's latent manifest names.

    Raises:
        DataError: the checkpoint's latent shards were not SDXL's (no such folder recorded).
    """
    manifest = record.get("latent_manifest", {})
    value = (
        (manifest.get("text_encoder_2") or {}).get("path") if name == "text_encoder_2" else manifest.get(f"{name}_path")
    )
    if not value or not object_store.names_folder(value):
        raise DataError(
            f"{ckpt_path}: an SDXL UNet, but its latent manifest names no {name} folder ({value!r}); "
            "train it on shards precomputed from an SDXL folder"
        )
    return model_folder(value)


def _sdxl_pipeline(
    ckpt_path: str | Path,
    record: dict[str, Any],
    models: dict[str, torch.nn.Module],
    vae_dir: str,
    tokenizer_dir: str,
    torch_dtype: torch.dtype,
) -> StableDiffusionXLPipeline:
    """The SDXL pipeline of a checkpoint's ``models`` (``unet``, ``text_encoder``, ``text_encoder_2``), its
    second tokenizer from the manifest's folder."""
    return StableDiffusionXLPipeline(
        vae=AutoencoderKL.from_pretrained(vae_dir, local_files_only=True, torch_dtype=torch_dtype),
        text_encoder=models["text_encoder"].to(torch_dtype),
        text_encoder_2=models["text_encoder_2"].to(torch_dtype),
        tokenizer=CLIPTokenizer.from_pretrained(tokenizer_dir, local_files_only=True),
        tokenizer_2=CLIPTokenizer.from_pretrained(
            _sdxl_folder(ckpt_path, record, "tokenizer_2"), local_files_only=True
        ),
        unet=models["unet"].to(torch_dtype),
        scheduler=DDPMScheduler.from_config(record["noise_scheduler_config"]),
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )


def export_pipeline(
    ckpt_path: str | Path,
    out_dir: str | Path,
    weights: Weights = "auto",
    vae_path: str | None = None,
    text_encoder_path: str | None = None,
    tokenizer_path: str | None = None,
    dtype: str = "float32",
) -> Path:
    """Write a diffusers pipeline folder for a checkpoint (atomically: complete or absent).

    Args:
        ckpt_path: a Lightning ``.ckpt`` file or a DeepSpeed checkpoint folder.
        out_dir: the folder to write.
        weights: ``"ema"``, ``"raw"``, or ``"auto"`` (EMA when the checkpoint has it).
        vae_path, text_encoder_path, tokenizer_path: override the encoder folders recorded in the
            checkpoint's latent-shard manifest.
        dtype: weights dtype of the saved UNet, VAE and text encoder.
    """
    pipe, info, adapters = build_export(
        ckpt_path, weights, vae_path, text_encoder_path, tokenizer_path, dtype, split_lora=True
    )
    kept, embeddings = info.pop(SET_ASIDE_INFO), info.pop(EMBEDDINGS_INFO)
    with atomic_path(out_dir) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        for embedding in embeddings:  # the base's encoders as they are, the learned tokens beside them
            save_embedding_files(tmp / EMBEDDINGS_DIR, embedding, {"global_step": str(info["global_step"])})
        if kept:  # for a single-file export of this folder later
            shutil.copyfile(kept, tmp / SET_ASIDE_FILE)
        if adapters:  # lora/ in diffusers' and kohya's layouts
            save_lora_files(
                tmp / LORA_DIR,
                adapters.get("unet"),
                adapters.get("text_encoder"),
                adapters.get("text_encoder_2"),
                sdxl_unet_names=sdxl_lora_names(pipe.unet),
            )
            for name in (KOHYA_LORA_FILE, LYCORIS_FILE) if embeddings else ():  # pivotal tuning: one file for the UIs
                if (tmp / LORA_DIR / name).is_file():  # AUTOMATIC1111 reads bundle_emb.* from LoRA and LyCORIS files
                    bundle_into(tmp / LORA_DIR / name, embeddings)
        (tmp / EXPORT_INFO_NAME).write_text(json.dumps(info, indent=2, default=str) + "\n", encoding="utf-8")
    log.info("exported %s (%s weights, step %s) to %s", ckpt_path, info["weights"], info["global_step"], out_dir)
    return Path(out_dir)


def export_single_file(
    source: str | Path,
    out_file: str | Path,
    weights: Weights = "auto",
    vae_path: str | None = None,
    text_encoder_path: str | None = None,
    tokenizer_path: str | None = None,
    dtype: str = "float32",
    text_layout: str = "auto",
) -> Path:
    """Write one ``.safetensors`` in the original SD or SDXL layout (AUTOMATIC1111, ComfyUI, ``from_single_file``).

    Args:
        source: a training checkpoint (as :func:`export_pipeline`), or an export folder
            (diffusers layout, read strictly).
        out_file: the ``.safetensors`` to write (atomically).
        dtype: ``"float16"`` halves the file.
        text_layout: the text encoder as SD 1.x's CLIP (``"sd1"``) or SD 2.x's OpenCLIP (``"sd2"``);
            ``"auto"``: ``"sd2"`` when the text encoder is OpenCLIP's (GELU activations), ``"sdxl"``
            (``conditioner.embedders.0`` CLIP, ``.1`` OpenCLIP with fused q/k/v) for an SDXL model.

    The step, the weights kind and the training config go in the safetensors metadata
    (``latentforge.global_step``, ``latentforge.weights``, ``latentforge.train_config``...), and the
    configs that rebuild the pipeline (``latentforge.configs``: parts, tokenizer settings, noise
    schedule), so ``lf-import`` rebuilds any architecture from the file alone. A v-prediction model
    carries ComfyUI's top-level ``v_pred`` marker (and ``ztsnr`` for a zero-terminal-SNR schedule);
    an SD 2.x one what ``lf-import`` set aside from its original file (OpenCLIP's last block,
    ``text_projection``, ``logit_scale``), or a note that nothing was.
    """
    from trainer.interop.pipeline_weights import (
        PipelineParts,
        load_diffusers_folder,
        metadata_strings,
        part_configs,
        save_single_file,
        text_layout_for,
    )

    source = Path(source)
    if (source / "model_index.json").is_file():
        parts = load_diffusers_folder(source)
        info_file = source / EXPORT_INFO_NAME
        info = json.loads(info_file.read_text(encoding="utf-8")) if info_file.is_file() else {}
        info["export"] = str(source.resolve())
        tokenizers = {
            name: CLIPTokenizer.from_pretrained(source / name, local_files_only=True)
            for name in ("tokenizer", "tokenizer_2")
            if name == "tokenizer" or parts.text_encoder_2 is not None
        }
        scheduler = dict(DDPMScheduler.load_config(source / "scheduler", local_files_only=True))
        kept = set_aside_file(source)
    else:
        pipe, info, _ = build_export(source, weights, vae_path, text_encoder_path, tokenizer_path)
        sdxl = isinstance(pipe, StableDiffusionXLPipeline)
        parts = PipelineParts(pipe.unet, pipe.vae, pipe.text_encoder, pipe.text_encoder_2 if sdxl else None)
        tokenizers = {"tokenizer": pipe.tokenizer} | ({"tokenizer_2": pipe.tokenizer_2} if sdxl else {})
        scheduler = dict(pipe.scheduler.config)
        kept = info.pop(SET_ASIDE_INFO)
        if info.pop(EMBEDDINGS_INFO):
            log.warning("%s: its textual-inversion embeddings are not in a single file; lf-export format=diffusers "
                        "writes them (embeddings/), or take <output_dir>/embeddings/", source)  # fmt: skip
    info.pop(SET_ASIDE_INFO, None)
    layout = text_layout_for(parts, text_layout)
    extra, info["set_aside"] = _set_aside(kept, layout, source)
    extra |= prediction_markers(scheduler)
    info["dtype"] = dtype
    info.pop("latent_manifest", None)
    tokenizer_settings = {
        name: {"model_max_length": tokenizer.model_max_length, "pad_token": str(tokenizer.pad_token)}
        for name, tokenizer in tokenizers.items()
    }
    info["configs"] = {**part_configs(parts), **tokenizer_settings, "scheduler": scheduler}
    save_single_file(
        parts, out_file, dtype=getattr(torch, dtype), metadata=metadata_strings(info), text_layout=layout, extra=extra
    )
    log.info("exported %s (step %s) to %s; %s", source, info.get("global_step"), out_file, info["set_aside"])
    return Path(out_file)


def _set_aside(kept: str | Path | None, layout: str, source: str | Path) -> tuple[dict[str, torch.Tensor], str]:
    """The tensors ``lf-import`` set aside that a single file in ``layout`` writes back, and the note saying so."""
    if layout != SET_ASIDE_LAYOUT:
        return {}, "nothing set aside to write back (only SD 2.x files hold weights the diffusers parts do not)"
    if not kept:
        return {}, (
            f"no {SET_ASIDE_FILE} beside the base folder of {source}: OpenCLIP's last block, text_projection "
            "and logit_scale are not in the file (SD 2.x does not use them; ComfyUI warns 'clip missing'). "
            "Import the base with lf-import to keep them"
        )
    tensors = read_set_aside(kept)
    return tensors, f"wrote back {len(tensors)} tensors lf-import set aside ({kept})"
