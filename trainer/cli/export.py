"""``lf-export``: a training checkpoint -> a diffusers pipeline folder.

Examples::

    lf-export ckpt_path=outputs/train/.../checkpoints/last.ckpt out_dir=export/step-1200
    lf-export ckpt_path=... out_dir=... weights=raw vae_path=sd15/vae
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from trainer.cli.hydra_app import CONF_DIR, VERSION_BASE
from trainer.export import export_pipeline


def run_export(cfg: DictConfig) -> dict[str, str]:
    """Export the configured checkpoint; returns ``{"out_dir": ...}``."""
    out = export_pipeline(
        cfg.ckpt_path,
        cfg.out_dir,
        weights=cfg.weights,
        vae_path=cfg.vae_path,
        text_encoder_path=cfg.text_encoder_path,
        tokenizer_path=cfg.tokenizer_path,
        dtype=cfg.dtype,
    )
    print(f"export: {cfg.ckpt_path} -> {out}")
    return {"out_dir": str(out)}


@hydra.main(version_base=VERSION_BASE, config_path=CONF_DIR, config_name="export")
def main(cfg: DictConfig) -> None:
    """Console entry point."""
    run_export(cfg)


if __name__ == "__main__":
    main()
