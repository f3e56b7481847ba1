"""Parts of a diffusers pipeline folder that training starts from: the UNet, the noise schedule, a text encoder.

The model configs call these (``conf/model/pretrained.yaml``, the DreamBooth recipes that train text
encoders): ``model.pretrained`` is a diffusers folder (``lf-import`` writes one from a single file),
loaded strictly, or its URL (downloaded once to the cache).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from diffusers import DDPMScheduler, UNet2DConditionModel
from hydra.utils import get_class

from lf_common.errors import ConfigError, DataError
from lf_common.object_cache import model_folder
from lf_common.object_store import join
from trainer.diffusion.noise_schedulers import DEFAULT_PREDICTION_TYPE, check_prediction_type
from trainer.interop.pipeline_weights import load_part

log = logging.getLogger(__name__)


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
