"""``lf-sample``: txt2img, img2img and inpainting from an export folder or a training checkpoint.

Each image is written as ``NNNNN-SEED.png`` with its parameters in the PNG ``parameters`` text
chunk (AUTOMATIC1111's layout); ``grid.png`` tiles them, one row per prompt.

Examples::

    lf-sample model_dir=export/step-1200 'prompts=["a handwritten digit seven"]' num_images_per_prompt=4
    lf-sample model_dir=... prompt_file=prompts.txt steps=30 guidance_scale=5 scheduler=dpmpp_2m
    lf-sample model_dir=... init_image=photo.png strength=0.6 'prompts=["a painting"]'
    lf-sample model_dir=... init_image=photo.png mask_image=mask.png 'prompts=["a cat"]'   # white: repaint
    lf-sample model_dir=... scheduler=dpmpp_2m use_karras_sigmas=true
    lf-sample model_dir=outputs/train/.../checkpoints/last.ckpt weights=raw   # a checkpoint, no export needed
    lf-sample model_dir=... from_png=outputs/.../00003-14.png        # the same image again, from its metadata
    lf-sample model_dir=export/xl 'prompts=["a cat"]' prompt_2="oil painting" negative_prompt=blurry   # SDXL
    lf-sample model_dir=... embeddings=outputs/train/.../embeddings/d7.safetensors 'prompts=["a handwritten <d7>"]'
    lf-sample model_dir=s3://bucket/export/step-1200 out_dir=s3://bucket/images   # downloaded once, uploaded

Keys::

    model_dir              an export folder (lf-export's out_dir) or a training checkpoint; s3://... too
    prompts                the prompts, a list: 'prompts=["a cat","a dog"]' (or prompt_file=PATH, s3://... too)
    from_png               re-make the image a PNG's parameters describe (s3://... too)
    vae_path, text_encoder_path, tokenizer_path   a checkpoint's encoder folders (s3://... too; default: its manifest's)
    embeddings             textual-inversion files: FILE or [FILE,FILE] (AUTOMATIC1111/ComfyUI or diffusers layout)
    num_images_per_prompt  images per prompt (image i gets seed + i)
    steps                  denoising steps
    guidance_scale         classifier-free guidance scale
    prompt_2               SDXL: the second text encoder's prompt for every image (null: each prompt)
    negative_prompt_2      SDXL: its negative prompt (null: negative_prompt)
    scheduler              ddim | euler | euler_a | dpmpp_2m
    max_token_length       75 | 150 | 225; null: as the export records (how its training captions were embedded)
    clip_skip              1 (last layer) | 2 (penultimate); null: as the export records (SD 1.x/2.x only)
    init_image             img2img (with mask_image: inpainting)
    out_dir                where the PNGs go (s3://... too: uploaded when done)
    cache_dir              local copies of s3:// inputs (default: $LF_CACHE_DIR, else ~/.cache/latentforge/objects)
"""

from __future__ import annotations

import io
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig
from PIL import Image
from tqdm.auto import tqdm

from lf_common import object_store
from lf_common.errors import ConfigError, DataError
from lf_common.object_cache import local_path, model_folder
from lf_common.staged_output import staged_output
from trainer.cli.command import lf_command
from trainer.sampling.png_info import GenerationParameters, image_grid, parse_parameters, read_parameters, save_png

if TYPE_CHECKING:  # torch and diffusers are imported when the job runs, so --help and config errors answer at once
    from trainer.sampling.sampler import Sampler, SampleSettings

DEFAULT_IMG2IMG_STRENGTH = 0.75


def read_prompts(cfg: DictConfig) -> list[str]:
    """Prompts from ``prompt_file`` (one per non-empty line; a local file or a URL) or ``prompts``."""
    from trainer.evaluation.prompts import read_prompt_file

    prompts = read_prompt_file(str(cfg.prompt_file)) if cfg.get("prompt_file") else list(cfg.prompts or [])
    if not prompts:
        raise DataError("no prompts: set prompts=[...] or prompt_file=PATH")
    return prompts


def _open_image(path: str | None, key: str) -> Image.Image | None:
    if not path:
        return None
    if not Path(path).is_file():
        raise DataError(f"{path}: {key} does not exist")
    with Image.open(path) as image:
        return image.convert("RGB") if key == "init_image" else image.copy()


def _from_png(path: str) -> GenerationParameters:
    try:
        text = read_parameters(io.BytesIO(object_store.read_path(path)))  # a URL: one GET
    except (FileNotFoundError, IsADirectoryError) as error:
        raise DataError(f"{path}: from_png does not exist") from error
    if not text:
        raise DataError(f"{path}: no 'parameters' text chunk to re-make the image from")
    return parse_parameters(text, source=path)


def plan(cfg: DictConfig) -> tuple[SampleSettings, list[str], list[int], float | None]:
    """The settings, one prompt and one seed per image, and the strength: from the config or ``from_png``."""
    from trainer.sampling.conditioning import micro_conditioning
    from trainer.sampling.sampler import SampleSettings
    from trainer.sampling.schedulers import from_display_name

    if cfg.get("from_png"):
        made = _from_png(cfg.from_png)
        scheduler, karras = from_display_name(made.sampler)
        settings = SampleSettings(
            negative_prompt=made.negative_prompt,
            steps=made.steps,
            guidance_scale=made.guidance_scale,
            guidance_rescale=made.guidance_rescale,
            scheduler=scheduler,
            use_karras_sigmas=karras,
            height=made.height,
            width=made.width,
            original_size=made.original_size,
            crop_top_left=made.crop_top_left,
            prompt_2=made.prompt_2,
            negative_prompt_2=made.negative_prompt_2,
        )
        if made.strength is not None and not cfg.get("init_image"):
            raise DataError(
                f"{cfg.from_png}: made with init_image (Denoising strength {made.strength:g}); pass init_image=..."
            )
        return settings, [made.prompt], [made.seed], made.strength if made.strength is not None else cfg.strength
    settings = SampleSettings(
        negative_prompt=cfg.negative_prompt,
        steps=cfg.steps,
        guidance_scale=cfg.guidance_scale,
        guidance_rescale=cfg.guidance_rescale,
        scheduler=cfg.scheduler,
        use_karras_sigmas=cfg.get("use_karras_sigmas", False),
        height=cfg.height,
        width=cfg.width,
        **micro_conditioning(cfg.get("original_size"), cfg.get("crop_top_left")),
        prompt_2=cfg.get("prompt_2"),
        negative_prompt_2=cfg.get("negative_prompt_2"),
    )
    prompts = [p for p in read_prompts(cfg) for _ in range(cfg.num_images_per_prompt)]
    return settings, prompts, [cfg.seed + i for i in range(len(prompts))], cfg.strength


def run_sample(cfg: DictConfig) -> dict[str, Any]:
    """Generate ``num_images_per_prompt`` images per prompt; image ``i`` uses seed ``seed + i``.

    With ``init_image``: img2img at ``strength``; with ``mask_image`` too: inpainting (white
    repaints). With ``from_png``: the one image whose parameters that PNG carries.

    Returns:
        ``paths`` (PNG files), ``prompts`` (each image's prompt), ``images`` (PIL), ``grid``.
    """
    settings, prompts, seeds, strength = plan(cfg)  # bad settings fail before any model loads
    encoding = text_encoding_overrides(cfg)
    if strength is None:
        strength = 1.0 if cfg.get("mask_image") else DEFAULT_IMG2IMG_STRENGTH
    if not 0.0 < strength <= 1.0:
        raise ConfigError(f"strength={strength}: expected 0 < strength <= 1")
    local = local_inputs(cfg)
    init_image = _open_image(local["init_image"], "init_image")
    mask_image = _open_image(local["mask_image"], "mask_image")
    if mask_image is not None and init_image is None:
        raise DataError(f"{cfg.mask_image}: mask_image needs init_image, the image to inpaint")

    from trainer.sampling.sampler import Sampler

    sampler = Sampler.load(
        local["model_dir"],
        device=cfg.device,
        dtype=cfg.dtype,
        weights=cfg.get("weights", "auto"),
        vae_path=local["vae_path"],
        text_encoder_path=local["text_encoder_path"],
        tokenizer_path=local["tokenizer_path"],
        vae_slicing=cfg.get("vae_slicing", False),
        vae_tiling=cfg.get("vae_tiling", False),
    )
    if encoding:  # else the export's record: prompts are embedded as the training captions were
        sampler.text_encoding = replace(sampler.text_encoding, **encoding)
        sampler.text_encoding.check_sdxl(sampler.sdxl)
    if cfg.get("embeddings"):
        from trainer.sampling.loading import load_embeddings

        text = sampler.prompt_encoder
        tokens = load_embeddings(embedding_files(cfg), list(text.tokenizers), list(text.text_encoders))
        print(f"sample: textual-inversion tokens {', '.join(tokens)}")
    if local["lora"]:
        from trainer.sampling.loading import load_lora_file

        text = sampler.prompt_encoder
        lora = local["lora"], sampler.unet, list(text.tokenizers), list(text.text_encoders), cfg.get("lora_scale", 1.0)
        for token in load_lora_file(*lora):  # pivotal tuning's
            print(f"sample: textual-inversion token {token} (bundled with the LoRA)")
    with staged_output(cfg.out_dir, replace=False) as out_dir:
        result = _generate(cfg, sampler, settings, prompts, seeds, strength, init_image, mask_image, out_dir)
    shown = object_store.display(cfg.out_dir)  # where the files are now (uploaded from a staging folder to a URL)
    result["paths"] = [object_store.join(shown, Path(p).name) for p in result["paths"]]
    result["grid"] = object_store.join(shown, "grid.png") if result["grid"] else None
    print(f"sample: {len(result['images'])} images -> {cfg.out_dir}")
    return result


def text_encoding_overrides(cfg: DictConfig) -> dict[str, int]:
    """``max_token_length`` and ``clip_skip`` where the config sets them (null: the export's record).

    Raises:
        ConfigError: a value :class:`~data_pipelines.latents.text_encoding.TextEncoding` refuses.
    """
    from data_pipelines.latents.text_encoding import TextEncoding

    overrides = {key: int(cfg[key]) for key in ("max_token_length", "clip_skip") if cfg.get(key) is not None}
    TextEncoding(**overrides)  # checked before any model loads
    return overrides


def embedding_files(cfg: DictConfig) -> list[str]:
    """``embeddings``: one file, a list (``[A,B]``) or a quoted ``"A,B"``: the local paths (URLs: their copies)."""
    value = cfg.embeddings
    paths = [p.strip() for p in value.split(",")] if isinstance(value, str) else [str(p) for p in value]
    return [local_path(p, cfg.get("cache_dir")) for p in paths if p]


ENCODER_FOLDERS = ("vae_path", "text_encoder_path", "tokenizer_path")
INPUTS = ("model_dir", *ENCODER_FOLDERS, "lora", "init_image", "mask_image")
"""The keys whose files or folders may be URLs (downloaded to ``cache_dir`` once, again only when changed)."""


def local_inputs(
    cfg: DictConfig, keys: tuple[str, ...] = INPUTS, cache_key: str = "cache_dir"
) -> dict[str, str | None]:
    """Each of ``keys`` as a local path (a URL's cached copy, in the folder the config key ``cache_key``
    names, else the default download cache), or ``None`` when unset."""
    cache = cfg.get(cache_key)
    return {
        key: (model_folder if key in ENCODER_FOLDERS else local_path)(cfg[key], cache) if cfg.get(key) else None
        for key in keys
    }


def _generate(
    cfg: DictConfig,
    sampler: Sampler,
    settings: SampleSettings,
    prompts: list[str],
    seeds: list[int],
    strength: float,
    init_image: Image.Image | None,
    mask_image: Image.Image | None,
    out_dir: Path,
) -> dict[str, Any]:
    """Generate the images in batches into ``out_dir`` (a local folder), and the grid."""
    out_dir.mkdir(parents=True, exist_ok=True)
    images, paths = [], []
    batches = range(0, len(prompts), cfg.batch_size)
    for start in tqdm(batches, desc="sample", unit="batch", disable=len(batches) < 2):  # with an ETA
        batch_prompts, batch_seeds = prompts[start : start + cfg.batch_size], seeds[start : start + cfg.batch_size]
        if init_image is None:
            batch, parameters = sampler.txt2img(batch_prompts, batch_seeds, settings)
        elif mask_image is None:
            batch, parameters = sampler.img2img(init_image, batch_prompts, batch_seeds, settings, strength)
        else:
            batch, parameters = sampler.inpaint(init_image, mask_image, batch_prompts, batch_seeds, settings, strength)
        for offset, (image, params) in enumerate(zip(batch, parameters, strict=True)):
            paths.append(save_png(image, out_dir / f"{start + offset:05d}-{params.seed}.png", params))
        images.extend(batch)
    grid = None
    if cfg.grid and len(images) > 1:
        grid = out_dir / "grid.png"
        image_grid(images, columns=min(cfg.num_images_per_prompt, len(images))).save(grid)
    return {"paths": [str(p) for p in paths], "prompts": prompts, "images": images, "grid": str(grid) if grid else None}


@lf_command("sample")
def main(cfg: DictConfig) -> None:
    """Console entry point."""
    run_sample(cfg)


if __name__ == "__main__":
    main()
