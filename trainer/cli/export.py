"""``lf-export``: a training checkpoint -> a diffusers pipeline folder, or one original-layout file.

Examples::

    lf-export ckpt_path=outputs/train/.../checkpoints/last.ckpt out_dir=export/step-1200
    lf-export ckpt_path=... out_dir=... weights=raw vae_path=sd15/vae
    lf-export ckpt_path=.../last.ckpt format=single_file out_dir=export/step-1200 dtype=float16
    lf-export ckpt_path=export/step-1200 format=single_file out_dir=x out_file=model.safetensors
    lf-export ckpt_path=s3://bucket/run/checkpoints/last.ckpt out_dir=s3://bucket/export/step-1200

Keys::

    ckpt_path    a .ckpt lf-train wrote, a DeepSpeed checkpoint folder, or (single_file) an export folder;
                 s3://... too (downloaded to cache_dir, only when changed)
    out_dir      the folder to write (single_file: OUT_DIR.safetensors unless out_file is set); s3://... too
    cache_dir    local copies of s3:// inputs (default: $LF_CACHE_DIR, else ~/.cache/latentforge/objects)
    vae_path, text_encoder_path, tokenizer_path
                 the encoder folders (s3://... too); default: those the checkpoint's latent manifest names
    format       diffusers (a pipeline folder) | single_file (the original SD, or SDXL, single-file layout)
    text_layout  single_file: auto (follows the model) | sd1 | sd2 | sdxl
    weights      auto (EMA when the checkpoint has it) | ema | raw
    dtype        float32 | float16 | bfloat16
"""

from __future__ import annotations

from omegaconf import DictConfig

from lf_common import object_store
from lf_common.errors import ConfigError
from lf_common.object_cache import local_path, model_folder
from lf_common.staged_output import staged_output
from trainer.cli.command import lf_command

FORMATS = ("diffusers", "single_file")
PIPELINE_INDEX = "model_index.json"
"""The file that makes a folder a diffusers pipeline: uploaded last."""


def run_export(cfg: DictConfig) -> dict[str, str]:
    """Export the configured checkpoint; returns ``{"out_dir": ...}`` or ``{"out_file": ...}``.

    A ``ckpt_path`` (or encoder path) in a bucket is downloaded to the cache first (``cache_dir``; only
    when changed); an ``out_dir``/``out_file`` in a bucket is written locally, then uploaded (a pipeline
    folder's ``model_index.json`` last, so the folder loads only once complete).
    """
    fmt = cfg.get("format", "diffusers")
    if fmt not in FORMATS:
        raise ConfigError(f"format={fmt!r}: expected one of {list(FORMATS)}")
    from trainer.checkpoint.export import export_pipeline, export_single_file  # torch: when the job runs

    cache = cfg.get("cache_dir")
    ckpt_path = local_path(cfg.ckpt_path, cache)
    encoders = {
        key: model_folder(cfg[key], cache) if cfg.get(key) else None
        for key in ("vae_path", "text_encoder_path", "tokenizer_path")
    }
    if fmt == "single_file":
        out_file = cfg.get("out_file") or f"{str(cfg.out_dir).rstrip('/')}.safetensors"
        with staged_output(out_file) as local:
            export_single_file(
                ckpt_path,
                local,
                weights=cfg.weights,
                dtype=cfg.dtype,
                text_layout=cfg.get("text_layout", "auto"),
                **encoders,
            )
        print(f"export: {cfg.ckpt_path} -> {out_file}")
        return {"out_file": object_store.display(out_file)}
    with staged_output(cfg.out_dir, last=(PIPELINE_INDEX,)) as local:
        export_pipeline(ckpt_path, local, weights=cfg.weights, dtype=cfg.dtype, **encoders)
    print(f"export: {cfg.ckpt_path} -> {cfg.out_dir}")
    return {"out_dir": object_store.display(cfg.out_dir)}


@lf_command("export")
def main(cfg: DictConfig) -> None:
    """Console entry point."""
    run_export(cfg)


if __name__ == "__main__":
    main()
