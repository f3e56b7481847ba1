"""``lf-import``: a user's local SD weights (diffusers folder or one original-layout file) -> a diffusers folder.

The weights are loaded strictly: every key mapped, every shape checked; pickles (``.ckpt``) are
refused unless ``allow_pickle=true``, and then read with ``torch.load(weights_only=True)``.

Examples::

    lf-import pretrained=sd15.safetensors config_dir=sd15-diffusers/ out_dir=models/sd15
    lf-import pretrained=sd15-diffusers/ out_dir=models/sd15          # a folder: checked, rewritten as safetensors
    lf-import pretrained=old.ckpt allow_pickle=true config_dir=... out_dir=...
    lf-train model=pretrained model.pretrained=models/sd15 data.train_dir=...   # then fine-tune from it
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from trainer.checkpoint.importing import import_weights
from trainer.cli.hydra_app import CONF_DIR, VERSION_BASE


def run_import(cfg: DictConfig) -> dict[str, str]:
    """Import ``cfg.pretrained`` into ``cfg.out_dir``; returns ``{"out_dir": ...}``."""
    out = import_weights(
        cfg.pretrained,
        cfg.out_dir,
        config_dir=cfg.config_dir,
        allow_pickle=cfg.allow_pickle,
        dtype=cfg.dtype,
        ema=cfg.get("ema", False),
    )
    print(f"import: {cfg.pretrained} -> {out}")
    return {"out_dir": str(out)}


@hydra.main(version_base=VERSION_BASE, config_path=CONF_DIR, config_name="import")
def main(cfg: DictConfig) -> None:
    """Console entry point."""
    run_import(cfg)


if __name__ == "__main__":
    main()
