"""``lf-import``: a user's local SD weights (one single file, or a diffusers folder) -> a diffusers folder.

A single file needs nothing else: its model type (SD 1.x, SD 2.x 512 or 768-v, SD 1.x/2.x
inpainting, SDXL base), configs and key layout are detected; the type, what the UNet predicts and how that was
decided are printed and stored in the folder's ``latentforge.json``. The weights are loaded
strictly: every key mapped, every shape checked; pickles (``.ckpt``) are refused unless
``allow_pickle=true``, and then read with ``torch.load(weights_only=True)``.

Examples::

    lf-import pretrained=sd15.safetensors                       # -> models/sd15
    lf-import pretrained=v2-1_768-ema-pruned.safetensors out_dir=models/sd21
    lf-import pretrained=sd21-base.safetensors prediction_type=epsilon   # name it instead of the test pass
    lf-import pretrained=old.ckpt allow_pickle=true ema=true    # ldm's model_ema.* copy as the UNet
    lf-import pretrained=sd15.safetensors config_dir=sd15-diffusers/     # configs from a diffusers folder
    lf-import pretrained=sd_xl_base_1.0.safetensors out_dir=models/sdxl  # SDXL base: a StableDiffusionXLPipeline folder
    lf-import pretrained=sd15-diffusers/ out_dir=models/sd15    # a folder: checked, rewritten as safetensors
    lf-import pretrained=s3://bucket/sd15.safetensors out_dir=s3://bucket/models/sd15   # a bucket, both ways
    lf-train model=pretrained model.pretrained=models/sd15 data.train_dir=...   # then fine-tune from it

Keys::

    pretrained       the weights: one .safetensors in the original SD layout, or a diffusers folder
    out_dir          the diffusers folder to write (default: models/<name of pretrained>)
    allow_pickle     read a .ckpt/.pt pickle (tensors only, weights_only=True); refused otherwise
    prediction_type  epsilon | v_prediction, instead of detecting it
    ema              take the UNet from the file's EMA copy (model_ema.*)
    cache_dir        local copies of s3:// inputs (default: $LF_CACHE_DIR, else ~/.cache/latentforge/objects)
    s3_endpoint_url  an S3-compatible store's endpoint (default: AWS_ENDPOINT_URL_S3, else AWS)

``pretrained`` and ``config_dir`` may be URLs (``s3://...``, any fsspec URL): downloaded once to the cache
(again only when changed). An ``out_dir`` URL is written locally, then uploaded with ``model_index.json``
last, so the folder loads only once complete.
"""

from __future__ import annotations

import json

from omegaconf import DictConfig

from lf_common import object_store
from lf_common.object_cache import local_path, model_folder
from lf_common.staged_output import staged_output
from trainer.cli.command import lf_command

PIPELINE_INDEX = "model_index.json"
"""The file that makes a folder a diffusers pipeline: uploaded last."""


def summary(info: dict) -> list[str]:
    """The lines ``lf-import`` prints about an import (from its ``latentforge.json``)."""
    lines = []
    if "model_type" in info:
        lines.append(f"detected: {info['model_title']} ({info['model_type']})")
        lines.append(f"predicts: {info['prediction_type']}, {info['prediction_type_how']}")
    lines.append(f"configs: {info['configs_from']}")
    if info.get("size_differences"):
        lines.append(f"sizes differ from the standard: {'; '.join(info['size_differences'])}")
    lines += [f"note: {note}" for note in info.get("notes", [])]
    return lines


def run_import(cfg: DictConfig) -> dict[str, str]:
    """Import ``cfg.pretrained``; returns ``{"out_dir": ..., "model_type": ...}``.

    A ``pretrained`` or ``config_dir`` in a bucket is imported from its cached local copy (``cache_dir``);
    an ``out_dir`` in a bucket is written locally, then uploaded (``model_index.json`` last).
    """
    from trainer.interop.import_weights import IMPORT_INFO_NAME, default_out_dir, import_weights  # torch: the job's

    cache = cfg.get("cache_dir")
    source = str(cfg.pretrained)
    config_dir = model_folder(cfg.config_dir, cache) if cfg.get("config_dir") else None
    target = str(cfg.get("out_dir") or default_out_dir(source.rstrip("/")))
    local_source = local_path(source, cache)
    with staged_output(target, last=(PIPELINE_INDEX,)) as local:
        import_weights(
            local_source,
            local,
            config_dir=config_dir,
            allow_pickle=cfg.allow_pickle,
            dtype=cfg.dtype,
            ema=cfg.get("ema", False),
            prediction_type=cfg.get("prediction_type"),
            imported_from=source if local_source != source else None,  # a copy of a URL names it
        )
        info = json.loads((local / IMPORT_INFO_NAME).read_text(encoding="utf-8"))
    shown = object_store.display(target)
    print(f"import: {cfg.pretrained} -> {shown}")
    for line in summary(info):
        print(f"  {line}")
    return {"out_dir": shown, "model_type": info.get("model_type", "")}


@lf_command("import")
def main(cfg: DictConfig) -> None:
    """Console entry point."""
    run_import(cfg)


if __name__ == "__main__":
    main()
