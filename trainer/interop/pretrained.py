"""A user's local SD 1.x/2.x or SDXL weights -> the starting point for training, loaded strictly.

Two sources: a diffusers pipeline folder, or one file in the original single-file layout
(``.safetensors``; ``.ckpt`` only with ``allow_pickle``, read with ``torch.load(weights_only=True)``),
whose model type, configs and layout are detected (:mod:`trainer.checkpoint.single_file_import`).
The import writes a diffusers folder with ``latentforge.json``: the detected type, what it
predicts and how that was decided, the layouts found and the notes on them.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    DDPMScheduler,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from hydra.utils import get_class
from transformers import CLIPTokenizer

from lf_common.atomic import atomic_path
from lf_common.errors import ConfigError, DataError
from lf_common.object_cache import model_folder
from lf_common.object_store import join
from trainer.checkpoint.export import INPAINTING_CHANNELS
from trainer.checkpoint.pipeline_weights import load_diffusers_folder, load_part, read_metadata
from trainer.checkpoint.prediction_test import OUR_CONFIGS_KEY
from trainer.checkpoint.single_file_import import ImportedPipeline, read_single_file
from trainer.diffusion.noise_schedulers import DEFAULT_PREDICTION_TYPE, check_prediction_type

log = logging.getLogger(__name__)
IMPORT_INFO_NAME = "latentforge.json"


def read_pipeline_weights(
    source: str | Path,
    config_dir: str | Path | None = None,
    allow_pickle: bool = False,
    ema: bool = False,
    prediction_type: str | None = None,
) -> ImportedPipeline:
    """The parts of ``source`` (a diffusers folder or a single file), with their tokenizer and noise schedule.

    Raises:
        DataError: ``source`` is missing.
        KeyMapError: a refused layout or type, or weights that do not match (every offending key named).
    """
    source = Path(source)
    if source.is_dir():
        parts = load_diffusers_folder(source, allow_pickle=allow_pickle)
        scheduler = dict(DDPMScheduler.load_config(source / "scheduler", local_files_only=True))
        if prediction_type:
            scheduler["prediction_type"] = prediction_type
        tokenizer = CLIPTokenizer.from_pretrained(source / "tokenizer", local_files_only=True)
        tokenizer_2 = None
        if parts.text_encoder_2 is not None:
            tokenizer_2 = CLIPTokenizer.from_pretrained(source / "tokenizer_2", local_files_only=True)
        info = {"configs_from": f"the folder ({source})"}
        return ImportedPipeline(parts, tokenizer, scheduler, None, info, tokenizer_2)
    if not source.is_file():
        raise DataError(f"{source}: does not exist; expected a diffusers folder or a .safetensors file")
    return read_single_file(source, config_dir, allow_pickle, ema, prediction_type)


def default_out_dir(source: str | Path) -> Path:
    """``models/<file or folder name without suffix>`` in the working directory."""
    return Path("models") / Path(source).stem


def import_weights(
    source: str | Path,
    out_dir: str | Path | None = None,
    config_dir: str | Path | None = None,
    allow_pickle: bool = False,
    dtype: str = "float32",
    ema: bool = False,
    prediction_type: str | None = None,
    imported_from: str | None = None,
) -> Path:
    """Write ``source`` as a diffusers pipeline folder (atomically) that training and sampling load.

    Args:
        out_dir: the folder to write; ``None``: :func:`default_out_dir`.
        ema: take the UNet from a single file's EMA copy (ldm's ``model_ema.*``).
        prediction_type: what the UNet predicts, instead of detecting it.
        imported_from: what ``latentforge.json`` records as the source (a URL whose local copy ``source``
            is); ``None``: ``source``'s absolute path.

    The folder serves as ``lf-train model=pretrained model.pretrained=OUT_DIR`` (the UNet and the
    noise schedule) and as ``lf-precompute pretrained=OUT_DIR`` (the VAE and text encoder); an
    inpainting model is written as diffusers' ``StableDiffusionInpaintPipeline``, an SDXL one as
    ``StableDiffusionXLPipeline``.
    """
    out_dir = Path(out_dir) if out_dir else default_out_dir(source)
    imported = read_pipeline_weights(source, config_dir, allow_pickle, ema, prediction_type)
    parts, torch_dtype = imported.parts, getattr(torch, dtype)
    if torch_dtype != parts.unet.dtype:
        for network in parts.networks().values():
            network.to(torch_dtype)
    pipe = _pipeline(imported)
    source = Path(source)
    metadata = read_metadata(source) if source.is_file() and source.suffix == ".safetensors" else {}
    metadata.pop(OUR_CONFIGS_KEY.removeprefix("latentforge."), None)
    # the file's own record (step, training config...) first; what this import found out wins
    info = {
        **metadata,
        "imported_from": imported_from or str(source.resolve()),
        "dtype": dtype,
        "ema": ema,
        **imported.info,
    }
    with atomic_path(out_dir) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        (tmp / IMPORT_INFO_NAME).write_text(json.dumps(info, indent=2, default=str) + "\n", encoding="utf-8")
    log.info("imported %s to %s", source, out_dir)
    return out_dir


def _pipeline(imported: ImportedPipeline) -> StableDiffusionPipeline | StableDiffusionXLPipeline:
    """The diffusers pipeline of imported parts: SDXL's with a second text encoder, else SD's (inpainting or not)."""
    parts, scheduler = imported.parts, DDPMScheduler.from_config(imported.scheduler_config)
    common = {"vae": parts.vae, "text_encoder": parts.text_encoder, "tokenizer": imported.tokenizer, "unet": parts.unet}
    if parts.text_encoder_2 is not None:
        return StableDiffusionXLPipeline(
            **common,
            text_encoder_2=parts.text_encoder_2,
            tokenizer_2=imported.tokenizer_2,
            scheduler=scheduler,
            force_zeros_for_empty_prompt=True,
            add_watermarker=False,
        )
    inpainting = parts.unet.config.in_channels == INPAINTING_CHANNELS
    pipeline_class = StableDiffusionInpaintPipeline if inpainting else StableDiffusionPipeline
    return pipeline_class(
        **common, scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )


def pretrained_part(path: str, subfolder: str, class_name: str) -> Any:
    """One part of a diffusers folder, ``path/subfolder`` (a text encoder, a tokenizer), through its class's
    ``from_pretrained`` with local files only.

    The DreamBooth recipes that train the text encoders call this. ``path`` may be a URL
    (``s3://bucket/models/sd15``): the part's folder is downloaded once to the cache (``$LF_CACHE_DIR``).

    Args:
        path: the diffusers folder (``model.pretrained``).
        subfolder: the part (``text_encoder``, ``tokenizer_2``, ...).
        class_name: its class, importable (``transformers.CLIPTextModel``).

    Raises:
        DataError: the part's folder is missing.
    """
    folder = Path(model_folder(join(path, subfolder)))
    if not folder.is_dir():
        raise DataError(f"{join(path, subfolder)}: the folder is missing; model.pretrained must be a diffusers folder")
    return get_class(class_name).from_pretrained(folder, local_files_only=True)


def pretrained_unet(path: str, allow_pickle: bool = False) -> UNet2DConditionModel:
    """The UNet of a diffusers folder (``path/unet``), built from its config and loaded strictly.

    The model config ``conf/model/pretrained.yaml`` calls this to start training from it. ``path`` may be a
    URL (``s3://bucket/models/sd15``): its ``unet/`` is downloaded once to the cache (``$LF_CACHE_DIR``).
    """
    unet_dir = Path(model_folder(join(path, "unet")))
    if not (unet_dir / "config.json").is_file():
        raise DataError(
            f"{path}: unet/config.json is missing; model.pretrained must be a diffusers folder (lf-import writes one)"
        )
    unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(unet_dir))
    return load_part(unet, unet_dir, allow_pickle)


def pretrained_noise_scheduler(
    path: str, prediction_type: str | None = None, allow_prediction_type_change: bool = False, **overrides: Any
) -> DDPMScheduler:
    """The training scheduler of a diffusers folder (``path/scheduler``), predicting what the base predicts.

    The model config ``conf/model/pretrained.yaml`` calls this, so fine-tuning an SD 2.x 768-v base
    trains v-prediction without the user having to know it.

    Args:
        path: the diffusers folder (or its URL: ``scheduler/`` is downloaded once to the cache).
        prediction_type: ``objective.prediction_type``: ``None`` takes the base's; a different one
            is refused unless ``allow_prediction_type_change``.
        allow_prediction_type_change: convert the base on purpose (e.g. epsilon to v-prediction).
        overrides: other scheduler settings (``clip_sample``, ``rescale_betas_zero_snr``, ...).

    Raises:
        DataError: the folder has no ``scheduler/scheduler_config.json``.
        ConfigError: ``prediction_type`` contradicts the base's and no change is allowed.
    """
    folder = Path(model_folder(join(path, "scheduler")))
    if not (folder / "scheduler_config.json").is_file():
        raise DataError(
            f"{path}: scheduler/scheduler_config.json is missing; model.pretrained must be a diffusers folder"
        )
    config = dict(DDPMScheduler.load_config(folder, local_files_only=True))
    base = config.get("prediction_type", DEFAULT_PREDICTION_TYPE)
    chosen = check_prediction_type(prediction_type or base)
    if chosen != base and not allow_prediction_type_change:
        raise ConfigError(
            f"{folder}: the base model predicts {base}, but objective.prediction_type={chosen}; leave the objective's "
            f"prediction type to the base (e.g. objective=default), or set objective.allow_prediction_type_change=true "
            "to convert the model on purpose"
        )
    changed = "" if chosen == base else f" (converted from the base's {base})"
    log.info("noise scheduler from %s: prediction_type=%s%s", folder, chosen, changed)
    return DDPMScheduler.from_config({**config, **overrides, "prediction_type": chosen})
