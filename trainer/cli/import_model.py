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
    lf-train model=pretrained model.pretrained=models/sd15 data.train_dir=...   # then fine-tune from it

Keys::

    pretrained       the weights: one .safetensors in the original SD layout, or a diffusers folder
    out_dir          the diffusers folder to write (default: models/<name of pretrained>)
    allow_pickle     read a .ckpt/.pt pickle (tensors only, weights_only=True); refused otherwise
    prediction_type  epsilon | v_prediction, instead of detecting it
    ema              take the UNet from the file's EMA copy (model_ema.*)
"""

from __future__ import annotations

import json

from omegaconf import DictConfig

from trainer.checkpoint.importing import IMPORT_INFO_NAME, import_weights
from trainer.cli.command import lf_command


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
    """Import ``cfg.pretrained``; returns ``{"out_dir": ..., "model_type": ...}``."""
    out = import_weights(
        cfg.pretrained,
        cfg.get("out_dir"),
        config_dir=cfg.get("config_dir"),
        allow_pickle=cfg.allow_pickle,
        dtype=cfg.dtype,
        ema=cfg.get("ema", False),
        prediction_type=cfg.get("prediction_type"),
    )
    info = json.loads((out / IMPORT_INFO_NAME).read_text(encoding="utf-8"))
    print(f"import: {cfg.pretrained} -> {out}")
    for line in summary(info):
        print(f"  {line}")
    return {"out_dir": str(out), "model_type": info.get("model_type", "")}


@lf_command("import")
def main(cfg: DictConfig) -> None:
    """Console entry point."""
    run_import(cfg)


if __name__ == "__main__":
    main()
