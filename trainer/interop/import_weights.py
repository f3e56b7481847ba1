"""One single file in, the right model out: read, normalise the layout, detect the type, build, load strictly.

1. read it through the pickle policy (:mod:`trainer.checkpoint.safe_load`);
2. map its key layout to the canonical one, or refuse it by name (:mod:`trainer.checkpoint.layouts`);
3. detect the model type from keys and shapes (:mod:`trainer.checkpoint.model_types`);
4. take the configs: ``config_dir`` when given, else the file's own (our exports carry them in
   ``latentforge.configs``), else the type's standard configs at the file's sizes
   (:mod:`trainer.checkpoint.architecture`);
5. decide what the UNet predicts where the type leaves it open (:mod:`trainer.checkpoint.prediction_test`);
6. load every part strictly (every key mapped, every shape checked).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from diffusers import DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTokenizer

from data_pipelines.latents.tokenizer import build_clip_tokenizer
from lf_common.errors import DataError
from trainer.checkpoint.architecture import Configs, differences, scaled_configs
from trainer.checkpoint.layouts import Normalized, normalize
from trainer.checkpoint.model_types import ModelType, candidates
from trainer.checkpoint.pipeline_weights import PipelineParts, build_parts, folder_configs, load_original_state
from trainer.checkpoint.prediction_test import (
    OUR_CONFIGS_KEY,
    PredictionType,
    by_test_forward,
    from_metadata,
    given,
)
from trainer.checkpoint.safe_load import read_weight_file
from trainer.checkpoint.sd_single_file import KeyMapError

log = logging.getLogger(__name__)
STANDARD = "standard configs"


@dataclass
class ImportedPipeline:
    """The parts of a single file, what they need beside them, and what was found out about the file.

    Attributes:
        parts: UNet, VAE and text encoder(s), loaded.
        tokenizer: the text encoder's tokenizer.
        tokenizer_2: SDXL's second tokenizer (``None`` for SD 1.x/2.x).
        scheduler_config: the noise schedule (with the prediction type decided).
        model_type: the detected row of :data:`~trainer.checkpoint.model_types.MODEL_TYPES` (``None``: a folder).
        info: what is printed and stored with the import (type, prediction type and how, layouts, notes).
    """

    parts: PipelineParts
    tokenizer: CLIPTokenizer
    scheduler_config: dict[str, Any]
    model_type: ModelType | None
    info: dict[str, Any] = field(default_factory=dict)
    tokenizer_2: CLIPTokenizer | None = None


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
    """The prediction type the user, ``config_dir`` or the file states (in that order), if any."""
    if prediction_type:
        return given(prediction_type)
    if configs_from.startswith("config_dir"):
        value = configs["scheduler"].get("prediction_type", "epsilon")
        return PredictionType(value, f"from {configs_from}'s scheduler")
    return from_metadata(normalized.metadata)


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
    log.info("%s: %s, %s %s", source, model_type.title, decision.value, decision.how)
    tokenizers = {"tokenizer": _tokenizer(configs, config_dir)}
    if parts.text_encoder_2 is not None:
        if (tokenizer_2 := _tokenizer(configs, config_dir, "tokenizer_2")) is None:
            raise KeyMapError(f"{source}: an SDXL file, but no tokenizer_2 in its configs or in config_dir")
        tokenizers["tokenizer_2"] = tokenizer_2
    return ImportedPipeline(parts, scheduler_config=scheduler_config, model_type=model_type, info=info, **tokenizers)
