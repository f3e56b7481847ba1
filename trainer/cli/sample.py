"""``lf-sample``: txt2img and img2img from an export folder.

Each image is written as ``NNNNN-SEED.png`` with its parameters in the PNG ``parameters`` text
chunk (AUTOMATIC1111's layout); ``grid.png`` tiles them, one row per prompt.

Examples::

    lf-sample model_dir=export/step-1200 'prompts=["a handwritten digit seven"]' num_images_per_prompt=4
    lf-sample model_dir=... prompt_file=prompts.txt steps=30 guidance_scale=5 scheduler=dpmpp_2m
    lf-sample model_dir=... init_image=photo.png strength=0.6 'prompts=["a painting"]'
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig
from PIL import Image

from data_pipelines.errors import DataError
from trainer.cli.hydra_app import CONF_DIR, VERSION_BASE
from trainer.sampling.png_info import image_grid, save_png
from trainer.sampling.sampler import Sampler, SampleSettings


def read_prompts(cfg: DictConfig) -> list[str]:
    """Prompts from ``prompt_file`` (one per non-empty line) or ``prompts``."""
    if cfg.get("prompt_file"):
        path = Path(cfg.prompt_file)
        if not path.is_file():
            raise DataError(f"{path}: prompt_file does not exist")
        prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    else:
        prompts = list(cfg.prompts or [])
    if not prompts:
        raise DataError("no prompts: set prompts=[...] or prompt_file=PATH")
    return prompts


def run_sample(cfg: DictConfig) -> dict[str, Any]:
    """Generate ``num_images_per_prompt`` images per prompt; image ``i`` uses seed ``seed + i``.

    Returns:
        ``paths`` (PNG files), ``prompts`` (each image's prompt), ``images`` (PIL), ``grid``.
    """
    sampler = Sampler.from_export(cfg.model_dir, device=cfg.device, dtype=cfg.dtype)
    settings = SampleSettings(
        negative_prompt=cfg.negative_prompt,
        steps=cfg.steps,
        guidance_scale=cfg.guidance_scale,
        guidance_rescale=cfg.guidance_rescale,
        scheduler=cfg.scheduler,
        height=cfg.height,
        width=cfg.width,
    )
    prompts = [p for p in read_prompts(cfg) for _ in range(cfg.num_images_per_prompt)]
    seeds = [cfg.seed + i for i in range(len(prompts))]
    init_image = None
    if cfg.get("init_image"):
        if not Path(cfg.init_image).is_file():
            raise DataError(f"{cfg.init_image}: init_image does not exist")
        init_image = Image.open(cfg.init_image)
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    images, paths = [], []
    for start in range(0, len(prompts), cfg.batch_size):
        batch_prompts, batch_seeds = prompts[start : start + cfg.batch_size], seeds[start : start + cfg.batch_size]
        if init_image is None:
            batch, parameters = sampler.txt2img(batch_prompts, batch_seeds, settings)
        else:
            batch, parameters = sampler.img2img(init_image, batch_prompts, batch_seeds, settings, cfg.strength)
        for offset, (image, params) in enumerate(zip(batch, parameters, strict=True)):
            paths.append(save_png(image, out_dir / f"{start + offset:05d}-{params.seed}.png", params))
        images.extend(batch)
    grid = None
    if cfg.grid:
        grid = out_dir / "grid.png"
        image_grid(images, columns=cfg.num_images_per_prompt).save(grid)
    print(f"sample: {len(images)} images -> {out_dir}")
    return {"paths": [str(p) for p in paths], "prompts": prompts, "images": images, "grid": str(grid) if grid else None}


@hydra.main(version_base=VERSION_BASE, config_path=CONF_DIR, config_name="sample")
def main(cfg: DictConfig) -> None:
    """Console entry point."""
    run_sample(cfg)


if __name__ == "__main__":
    main()
