"""``lf-eval``: FID, KID and CLIP score of a model (an export or a training checkpoint).

Generates images for a prompt set with the included sampler, each rank its share, and scores them:
FID and KID against a reference image set (its features cached, keyed by its content and the
feature extractor), CLIP score against their prompts. Prints a table; writes ``eval.json``, the
images (``images/NNNNN-SEED.png``, parameters in their PNG text) and ``grid.png`` to ``out_dir``.

Examples::

    lf-eval model_dir=export/step-5000 prompt_file=prompts.txt reference=data/coco-val clip=models/clip-vit-l-14
    lf-eval model_dir=outputs/train/.../checkpoints/last.ckpt prompt_shards=data/heldout reference=data/heldout
    lf-eval model_dir=... ... devices=4                     # 4 processes (GPUs), images split between them
    lf-eval images_dir=outputs/sample/.../images reference=... clip=...   # images made already (lf-sample's)

Keys::

    model_dir       an export folder, or a training checkpoint (.ckpt file, DeepSpeed folder)
    images_dir      instead of model_dir: images made already (prompts from their PNG parameters)
    prompt_file     one prompt a line (or prompts=[...], or prompt_shards= raw shards' captions)
    reference       real images for FID/KID: a folder of images, or raw shards
    clip            a local CLIP folder (transformers layout) for the CLIP score
    features        FID/KID features: inception (the FID weights file) | digits | clip
    devices         processes (GPUs); the images are split between them
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from lf_common.atomic import write_json_atomic
from lf_common.errors import DataError
from trainer.cli.command import lf_command
from trainer.evaluation.distributed import RankShare
from trainer.evaluation.evaluator import ImageEvaluator, gather_images
from trainer.evaluation.prompts import read_prompt_set
from trainer.evaluation.reference import IMAGE_SUFFIXES
from trainer.sampling.conditioning import micro_conditioning
from trainer.sampling.png_info import image_grid, parse_parameters, read_parameters, save_png
from trainer.sampling.sampler import Sampler, SampleSettings

log = logging.getLogger(__name__)
RESULT_NAME = "eval.json"
GRID_NAME = "grid.png"  # lf-sample's and lf-eval's grid, not a sample
METRIC_LABELS = {"fid": "FID", "kid": "KID", "clip_score": "CLIP score"}


def _launch(cfg: DictConfig) -> L.Fabric:
    """Start this process's rank (and, for ``devices > 1`` without a launcher, the other ranks)."""
    processes = int(cfg.devices) * int(cfg.num_nodes)
    strategy = "ddp" if processes > 1 else "auto"
    fabric = L.Fabric(accelerator=cfg.accelerator, devices=cfg.devices, num_nodes=cfg.num_nodes, strategy=strategy)
    fabric.launch()
    return fabric


def _evaluator(cfg: DictConfig) -> ImageEvaluator:
    """The configured evaluator: FID/KID when ``reference`` is set, CLIP score when ``clip`` is."""
    reference = cfg.get("reference")
    return ImageEvaluator(
        features=instantiate(cfg.features) if reference else None,
        reference=OmegaConf.to_object(reference) if OmegaConf.is_config(reference) else reference,
        clip=cfg.get("clip"),
        cache_dir=cfg.get("cache_dir"),
        kid_subsets=cfg.kid_subsets,
        kid_subset_size=cfg.kid_subset_size,
        seed=cfg.seed,
        batch_size=cfg.feature_batch_size,
    )


def _settings(cfg: DictConfig) -> SampleSettings:
    return SampleSettings(
        negative_prompt=cfg.negative_prompt,
        steps=cfg.steps,
        guidance_scale=cfg.guidance_scale,
        guidance_rescale=cfg.guidance_rescale,
        scheduler=cfg.scheduler,
        use_karras_sigmas=cfg.use_karras_sigmas,
        height=cfg.height,
        width=cfg.width,
        **micro_conditioning(cfg.get("original_size"), cfg.get("crop_top_left")),
    )


def _generate(cfg: DictConfig, fabric: L.Fabric, evaluator: ImageEvaluator, out: Path) -> dict[str, Any]:
    """Generate this rank's share of the images (saved with their parameters); prepare the reference first."""
    prompts = read_prompt_set(cfg.get("prompts"), cfg.get("prompt_file"), cfg.get("prompt_shards"), cfg.max_prompts)
    prompts = [p for p in prompts for _ in range(cfg.num_images_per_prompt)]
    seeds = [cfg.seed + i for i in range(len(prompts))]
    evaluator.check_count(len(prompts))
    settings = _settings(cfg)  # bad settings fail before any model loads
    sampler = Sampler.load(
        cfg.model_dir,
        device=str(fabric.device),
        dtype=cfg.dtype,
        weights=cfg.weights,
        vae_path=cfg.get("vae_path"),
        text_encoder_path=cfg.get("text_encoder_path"),
        tokenizer_path=cfg.get("tokenizer_path"),
    )
    start = time.perf_counter()
    evaluator.prepare(sampler.image_size(settings))
    seconds = {"reference": time.perf_counter() - start}
    share = RankShare.current(len(prompts))
    start = time.perf_counter()
    my_prompts = [prompts[i] for i in share.indices]
    my_seeds = [seeds[i] for i in share.indices]
    images, parameters = sampler.txt2img_batches(my_prompts, my_seeds, settings, cfg.batch_size)
    seconds["generate"] = time.perf_counter() - start
    (out / "images").mkdir(parents=True, exist_ok=True)
    for index, valid, image, params in zip(share.indices, share.valid, images, parameters, strict=True):
        if valid:
            save_png(image, out / "images" / f"{index:05d}-{params.seed}.png", params)
    return {"share": share, "images": images, "prompts": my_prompts, "seconds": seconds, "model": str(cfg.model_dir)}


def _existing_images(cfg: DictConfig, evaluator: ImageEvaluator) -> dict[str, Any]:
    """This rank's share of the images in ``images_dir`` (their prompts from their PNG parameters), but
    ``grid.png``."""
    folder = Path(cfg.images_dir)
    found = folder.glob("*") if folder.is_dir() else []
    paths = sorted(p for p in found if p.suffix.lower() in IMAGE_SUFFIXES and p.name != GRID_NAME)
    if not paths:
        raise DataError(f"{folder}: images_dir holds no images ({', '.join(IMAGE_SUFFIXES)})")
    prompts = None
    if evaluator.clip is not None:  # every rank reads every prompt, so all agree before scoring
        prompts = []
        for path in paths:
            text = read_parameters(path) if path.suffix.lower() == ".png" else ""
            if not text:
                raise DataError(f"{path}: no 'parameters' text chunk with the prompt, which the CLIP score needs")
            prompts.append(parse_parameters(text, source=str(path)).prompt)
    evaluator.check_count(len(paths))
    share = RankShare.current(len(paths))
    images = []
    for index in share.indices:
        with Image.open(paths[index]) as image:
            images.append(image.convert("RGB"))
    start = time.perf_counter()
    evaluator.prepare((images[0].height, images[0].width))
    my_prompts = [prompts[i] for i in share.indices] if prompts else None
    seconds = {"reference": time.perf_counter() - start}
    return {"share": share, "images": images, "prompts": my_prompts, "seconds": seconds, "model": None}


def metrics_table(results: dict[str, Any]) -> list[str]:
    """The metrics as the lines of a small table."""
    lines = [f"{'metric':<12} {'value':>18}"]
    if "fid" in results:
        lines.append(f"{'FID':<12} {results['fid']:>18.4f}")
        lines.append(f"{'KID':<12} {results['kid']:>9.5f} ± {results['kid_std']:.5f}")
    if "clip_score" in results:
        lines.append(f"{'CLIP score':<12} {results['clip_score']:>18.4f}")
    lines.append(f"{'images':<12} {int(results['num_images']):>18}")
    if "num_reference" in results:
        lines.append(f"{'reference':<12} {int(results['num_reference']):>18}")
    return lines


def run_eval(cfg: DictConfig) -> dict[str, Any]:
    """Generate (or read) the images, score them on every rank, and report on rank 0.

    Returns:
        The metrics (``fid``, ``kid``, ``kid_std``, ``clip_score``, ``num_images``,
        ``num_reference``), ``reference`` (its description, content hash, cache entry and whether
        it was read from the cache), ``seconds`` per phase, ``out_dir`` and ``grid``; the same as
        ``eval.json``.
    """
    if bool(cfg.get("model_dir")) == bool(cfg.get("images_dir")):
        raise DataError("lf-eval: set exactly one of model_dir=EXPORT_OR_CHECKPOINT or images_dir=FOLDER")
    fabric = _launch(cfg)
    evaluator = _evaluator(cfg).to(fabric.device)
    out = Path(cfg.out_dir)
    made = _generate(cfg, fabric, evaluator, out) if cfg.get("model_dir") else _existing_images(cfg, evaluator)
    start = time.perf_counter()
    metrics = evaluator.evaluate(made["share"], made["images"], made["prompts"])
    made["seconds"]["metrics"] = time.perf_counter() - start
    grid_images = gather_images(made["share"], made["images"], cfg.grid_images)
    reference = evaluator.reference_features
    result: dict[str, Any] = {
        **metrics,
        "model": made["model"],
        "images_dir": str(out / "images") if made["model"] else str(cfg.images_dir),
        "reference": None
        if reference is None
        else {
            "description": evaluator.reference.description,
            "content_sha256": reference.key.content_sha256,
            "extractor": reference.key.extractor,
            "cache_entry": str(reference.path) if reference.path else None,
            "cached": reference.cached,
        },
        "processes": made["share"].world,
        "seconds": {k: round(v, 2) for k, v in made["seconds"].items()},
        "out_dir": str(out),
        "grid": None,
    }
    if fabric.global_rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        if len(grid_images) > 1:
            columns = cfg.num_images_per_prompt if made["model"] and cfg.num_images_per_prompt > 1 else 8
            image_grid(grid_images, columns=min(columns, len(grid_images))).save(out / GRID_NAME)
            result["grid"] = str(out / GRID_NAME)
        write_json_atomic(out / RESULT_NAME, {**result, "config": OmegaConf.to_container(cfg, resolve=True)})
        print("\n".join(metrics_table(result)))
        print(f"eval: {RESULT_NAME}, images and grid -> {out}")
    return result


@lf_command("eval")
def main(cfg: DictConfig) -> None:
    """Console entry point."""
    run_eval(cfg)


if __name__ == "__main__":
    main()
