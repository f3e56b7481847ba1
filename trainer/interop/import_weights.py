"""``lf-import``'s work: a user's SD 1.x/2.x or SDXL weights -> a diffusers folder to train from, loaded strictly.

Two sources: a diffusers pipeline folder (checked, rewritten as safetensors), or one file in the
original single-file layout (``.safetensors``; ``.ckpt`` only with ``allow_pickle``, read with
``torch.load(weights_only=True)``). A single file goes through:

1. reading through the pickle policy (:mod:`trainer.interop.safe_load`);
2. mapping its key layout to the canonical one, or refusing it by name (:mod:`trainer.interop.layouts`);
3. detecting the model type from keys and shapes (:mod:`trainer.interop.model_types`);
4. taking the configs: ``config_dir`` when given, else the file's own (our exports carry them in
   ``latentforge.configs``), else the type's standard configs at the file's sizes
   (:mod:`trainer.interop.architecture`);
5. deciding what the UNet predicts where the type leaves it open (:mod:`trainer.interop.prediction_type`);
6. loading every part strictly (every key mapped, every shape checked).

:func:`import_weights` writes the folder with ``latentforge.json``: the detected type, what it
predicts and how that was decided, the layouts found and the notes on them.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
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
from transformers import CLIPTokenizer

from data_pipelines.latents.tokenizer import build_clip_tokenizer
from lf_common.atomic import atomic_path
from lf_common.errors import DataError
from trainer.diffusion.unet_kinds import is_inpainting_unet
from trainer.interop.architecture import Configs, differences, scaled_configs
from trainer.interop.layouts import Normalized, normalize
from trainer.interop.model_types import ModelType, candidates
from trainer.interop.pipeline_weights import (
    PipelineParts,
    build_parts,
    folder_configs,
    load_diffusers_folder,
    load_original_state,
    read_metadata,
)
from trainer.interop.prediction_type import (
    OUR_CONFIGS_KEY,
    PredictionType,
    by_test_forward,
    from_metadata,
    given,
    zero_terminal_snr,
)
from trainer.interop.safe_load import read_weight_file, refuse_non_floating
from trainer.interop.sd_single_file import V_PRED_KEY, KeyMapError
from trainer.interop.set_aside import SET_ASIDE_FILE, read_set_aside, set_aside_file, write_set_aside

log = logging.getLogger(__name__)
IMPORT_INFO_NAME = "latentforge.json"
STANDARD = "standard configs"


@dataclass
class ImportedPipeline:
    """The parts of a single file, what they need beside them, and what was found out about the file.

    Attributes:
        parts: UNet, VAE and text encoder(s), loaded.
        tokenizer: the text encoder's tokenizer.
        tokenizer_2: SDXL's second tokenizer (``None`` for SD 1.x/2.x).
        scheduler_config: the noise schedule (with the prediction type decided).
        model_type: the detected row of :data:`~trainer.interop.model_types.MODEL_TYPES` (``None``: a folder).
        info: what is printed and stored with the import (type, prediction type and how, layouts, notes).
        set_aside: weights of the file the parts have no place for (original keys), kept beside the import
            (:mod:`trainer.interop.set_aside`).
    """

    parts: PipelineParts
    tokenizer: CLIPTokenizer
    scheduler_config: dict[str, Any]
    model_type: ModelType | None
    info: dict[str, Any] = field(default_factory=dict)
    tokenizer_2: CLIPTokenizer | None = None
    set_aside: dict[str, torch.Tensor] = field(default_factory=dict)


def _configs(
    normalized: Normalized, model_type: ModelType, config_dir: str | Path | None, source: str
) -> tuple[Configs, str]:
    """The parts' configs and where they came from (``config_dir``, the file's metadata, or the standard)."""
    if config_dir is not None:
        configs = folder_configs(config_dir)
        configs["scheduler"] = dict(DDPMScheduler.load_config(Path(config_dir) / "scheduler", local_files_only=True))
        return configs, f"config_dir ({config_dir})"
    if OUR_CONFIGS_KEY in normalized.metadata:
        return json.loads(normalized.metadata[OUR_CONFIGS_KEY]), f"the file's metadata ({OUR_CONFIGS_KEY})"
    if not model_type.has_standard_configs:
        raise KeyMapError(
            f"{source}: a {model_type.title} file without latentforge's configs in its metadata; pass "
            f"config_dir=FOLDER (a diffusers {model_type.title} folder with the same architecture) to read it"
        )
    return scaled_configs(normalized.state, model_type, source), f"the {model_type.title} {STANDARD}"


def _stated_prediction_type(
    prediction_type: str | None, configs: Configs, configs_from: str, normalized: Normalized
) -> PredictionType | None:
    """The prediction type the user, the file's ``v_pred`` marker, ``config_dir`` or the file's metadata states
    (in that order), if any: a ``config_dir`` gives the architecture, and is often the base a v-prediction
    file was fine-tuned from."""
    if prediction_type:
        return given(prediction_type)
    if V_PRED_KEY in normalized.markers:
        return from_metadata({}, normalized.markers)
    if configs_from.startswith("config_dir"):
        value = configs["scheduler"].get("prediction_type", "epsilon")
        return PredictionType(value, f"from {configs_from}'s scheduler")
    return from_metadata(normalized.metadata, normalized.markers)


TEXT_LAYOUT_OF = {"clip": "sd1", "open_clip": "sd2", "sdxl": "sdxl"}  # a type's text encoder -> single-file layout


def _load(configs: Configs, normalized: Normalized, model_type: ModelType, source: str) -> PipelineParts:
    parts = build_parts(configs)
    if (model_type.text_encoder == "sdxl") != (parts.text_encoder_2 is not None):
        has = "have" if parts.text_encoder_2 is not None else "have no"
        raise KeyMapError(f"{source}: a {model_type.title} file, but its configs {has} text_encoder_2 (SDXL's)")
    load_original_state(parts, normalized.state, source, TEXT_LAYOUT_OF[model_type.text_encoder])
    return parts


def _tokenizer(configs: Configs, config_dir: str | Path | None, name: str = "tokenizer") -> CLIPTokenizer | None:
    """The tokenizer ``name`` (``tokenizer``, or SDXL's ``tokenizer_2``) from ``config_dir`` or the file's configs."""
    if config_dir is not None:
        folder = Path(config_dir) / name
        return CLIPTokenizer.from_pretrained(folder, local_files_only=True) if folder.is_dir() else None
    settings = configs.get(name)
    return build_clip_tokenizer(int(settings["model_max_length"]), settings["pad_token"]) if settings else None


def read_single_file(
    path: str | Path,
    config_dir: str | Path | None = None,
    allow_pickle: bool = False,
    ema: bool = False,
    prediction_type: str | None = None,
) -> ImportedPipeline:
    """Read one original-layout file (``.safetensors``, or ``.ckpt`` with ``allow_pickle``) into loaded parts.

    Args:
        config_dir: a diffusers folder whose configs, tokenizer and scheduler to use instead of detecting them.
        ema: take the UNet from the file's EMA copy (ldm's ``model_ema.*``) where it holds one beside the UNet.
        prediction_type: ``epsilon`` or ``v_prediction``: what the UNet predicts, instead of
            detecting it (SD 2.x 512 vs 768-v).

    Raises:
        KeyMapError: a refused layout or type, or keys that do not map (all named, with the file).
        DataError: a pickle without ``allow_pickle``; ``ema`` without an EMA copy.
    """
    source = str(path)
    normalized = normalize(read_weight_file(path, allow_pickle), source, ema)
    if ema and not any("EMA" in name for name in normalized.layouts):
        raise DataError(f"{path}: ema=true, but the file holds no EMA weights (model_ema.*)")
    refuse_non_floating(normalized.state, source)
    rows = candidates(normalized.state, source)
    configs, configs_from = _configs(normalized, rows[0], config_dir, source)
    decision = _stated_prediction_type(prediction_type, configs, configs_from, normalized)
    parts = None
    if decision is None and len(rows) > 1:  # SD 2.x: 512 epsilon or 768 v
        parts = _load(configs, normalized, rows[0], source)
        decision = by_test_forward(parts.unet)
    if decision is None:
        decision = PredictionType(rows[0].prediction_type, f"the {rows[0].title} standard")
    model_type = next((row for row in rows if row.prediction_type == decision.value), rows[0])
    standard = configs_from.endswith(STANDARD)
    if model_type is not rows[0] and standard:
        configs = scaled_configs(normalized.state, model_type, source)
        configs_from = f"the {model_type.title} {STANDARD}"
        if parts is not None:  # same weights, the other type's UNet config (image size, attention upcast)
            unet = UNet2DConditionModel.from_config(configs["unet"])
            unet.load_state_dict(parts.unet.state_dict(), strict=True)
            parts.unet = unet
    parts = parts or _load(configs, normalized, model_type, source)
    scheduler_config = {**configs["scheduler"], "prediction_type": decision.value}
    if zero_terminal_snr(normalized.markers):  # ComfyUI's zsnr: betas rescaled to zero terminal SNR
        scheduler_config["rescale_betas_zero_snr"] = True
    info = {
        "model_type": model_type.name,
        "model_title": model_type.title,
        "prediction_type": decision.value,
        "prediction_type_how": decision.how,
        "configs_from": configs_from,
        "size_differences": differences(configs, model_type) if standard else [],
        "layouts": normalized.layouts,
        "notes": normalized.notes,
    }
    if normalized.set_aside:
        info["set_aside"] = {"file": SET_ASIDE_FILE, "keys": sorted(normalized.set_aside)}
    log.info("%s: %s, %s %s", source, model_type.title, decision.value, decision.how)
    tokenizers = {"tokenizer": _tokenizer(configs, config_dir)}
    if parts.text_encoder_2 is not None:
        if (tokenizer_2 := _tokenizer(configs, config_dir, "tokenizer_2")) is None:
            raise KeyMapError(f"{source}: an SDXL file, but no tokenizer_2 in its configs or in config_dir")
        tokenizers["tokenizer_2"] = tokenizer_2
    return ImportedPipeline(
        parts,
        scheduler_config=scheduler_config,
        model_type=model_type,
        info=info,
        set_aside=normalized.set_aside,
        **tokenizers,
    )


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
        kept = set_aside_file(source)  # a folder lf-import wrote keeps what its single file set aside
        set_aside = read_set_aside(kept) if kept else {}
        return ImportedPipeline(parts, tokenizer, scheduler, None, info, tokenizer_2, set_aside)
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
        write_set_aside(tmp, imported.set_aside, torch_dtype)
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
    inpainting = is_inpainting_unet(parts.unet.config)
    pipeline_class = StableDiffusionInpaintPipeline if inpainting else StableDiffusionPipeline
    return pipeline_class(
        **common, scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
