"""``lf-export``: a training checkpoint -> a diffusers pipeline folder, or one original-layout file.

Examples::

    lf-export ckpt_path=outputs/train/.../checkpoints/last.ckpt out_dir=export/step-1200
    lf-export ckpt_path=... out_dir=... weights=raw vae_path=sd15/vae
    lf-export ckpt_path=.../last.ckpt format=single_file out_dir=export/step-1200 dtype=float16
    lf-export ckpt_path=export/step-1200 format=single_file out_dir=x out_file=model.safetensors

Keys::

    ckpt_path    a .ckpt lf-train wrote, a DeepSpeed checkpoint folder, or (single_file) an export folder
    out_dir      the folder to write (single_file: OUT_DIR.safetensors unless out_file is set)
    format       diffusers (a pipeline folder) | single_file (the original SD, or SDXL, single-file layout)
    text_layout  single_file: auto (follows the model) | sd1 | sd2 | sdxl
    weights      auto (EMA when the checkpoint has it) | ema | raw
    dtype        float32 | float16 | bfloat16
"""

from __future__ import annotations

from omegaconf import DictConfig

from lf_common.errors import ConfigError
from trainer.checkpoint.export import export_pipeline, export_single_file
from trainer.cli.command import lf_command

FORMATS = ("diffusers", "single_file")


def run_export(cfg: DictConfig) -> dict[str, str]:
    """Export the configured checkpoint; returns ``{"out_dir": ...}`` or ``{"out_file": ...}``."""
    fmt = cfg.get("format", "diffusers")
    if fmt not in FORMATS:
        raise ConfigError(f"format={fmt!r}: expected one of {list(FORMATS)}")
    if fmt == "single_file":
        out_file = cfg.get("out_file") or f"{str(cfg.out_dir).rstrip('/')}.safetensors"
        written = export_single_file(
            cfg.ckpt_path,
            out_file,
            weights=cfg.weights,
            vae_path=cfg.vae_path,
            text_encoder_path=cfg.text_encoder_path,
            tokenizer_path=cfg.tokenizer_path,
            dtype=cfg.dtype,
            text_layout=cfg.get("text_layout", "auto"),
        )
        print(f"export: {cfg.ckpt_path} -> {written}")
        return {"out_file": str(written)}
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


@lf_command("export")
def main(cfg: DictConfig) -> None:
    """Console entry point."""
    run_export(cfg)


if __name__ == "__main__":
    main()
