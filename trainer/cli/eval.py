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
    lf-eval model_dir=s3://bucket/export/step-5000 prompt_file=s3://bucket/prompts.txt reference=s3://bucket/val/
    lf-eval images_dir=s3://bucket/images reference=s3://bucket/val/ out_dir=s3://bucket/eval   # eval.json goes up last

Keys::

    model_dir       an export folder, or a training checkpoint (.ckpt file, DeepSpeed folder); s3://... too
    images_dir      instead of model_dir: images made already (prompts from their PNG parameters); s3://... too
    prompt_file     one prompt a line (or prompts=[...], or prompt_shards= raw shards' captions); s3://... too
    reference       real images for FID/KID: a folder of images, or raw shards; s3://... too
    clip            a CLIP folder (transformers layout) for the CLIP score; s3://... too
    features        FID/KID features: inception (the FID weights file) | digits | clip
    devices         processes (GPUs); the images are split between them
    out_dir         eval.json, images/ and grid.png (s3://... too: uploaded, eval.json last)
    download_cache_dir  local copies of s3:// inputs (default: $LF_CACHE_DIR, else ~/.cache/latentforge/objects)

Every path may be a URL (``s3://...``, any fsspec URL): raw shards are streamed; a model, encoder or
CLIP folder, a checkpoint and a folder of images are downloaded once into the download cache.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from lf_common import object_store
from lf_common.errors import DataError
from lf_common.object_cache import local_copy
from lf_common.staged_output import staged_output
from trainer.cli.command import lf_command
from trainer.cli.sample import ENCODER_FOLDERS, local_inputs
from trainer.sampling.png_info import image_grid, parse_parameters, read_parameters, save_png

if TYPE_CHECKING:  # Lightning, torch and diffusers are imported when the job runs (--help answers at once)
    import lightning as L

    from trainer.evaluation.evaluator import ImageEvaluator
    from trainer.sampling.sampler import SampleSettings

log = logging.getLogger(__name__)
RESULT_NAME = "eval.json"
GRID_NAME = "grid.png"  # lf-sample's and lf-eval's grid, not a sample
METRIC_LABELS = {"fid": "FID", "kid": "KID", "clip_score": "CLIP score"}
MODEL_INPUTS = ("model_dir", *ENCODER_FOLDERS)
"""The model's paths, which may be URLs (downloaded to ``download_cache_dir`` once, again only when changed)."""
DOWNLOAD_CACHE_KEY = "download_cache_dir"
"""The key naming the download cache (``cache_dir`` is the reference features' cache here)."""


def _launch(cfg: DictConfig) -> L.Fabric:
    """Start this process's rank (and, for ``devices > 1`` without a launcher, the other ranks)."""
    import lightning as L

    processes = int(cfg.devices) * int(cfg.num_nodes)
    strategy = "ddp" if processes > 1 else "auto"
    fabric = L.Fabric(accelerator=cfg.accelerator, devices=cfg.devices, num_nodes=cfg.num_nodes, strategy=strategy)
    fabric.launch()
    return fabric


def _evaluator(cfg: DictConfig) -> ImageEvaluator:
    """The configured evaluator: FID/KID when ``reference`` is set, CLIP score when ``clip`` is."""
    from trainer.evaluation.evaluator import ImageEvaluator

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
        download_cache_dir=cfg.get(DOWNLOAD_CACHE_KEY),
    )


def _settings(cfg: DictConfig) -> SampleSettings:
    from trainer.sampling.conditioning import micro_conditioning
    from trainer.sampling.sampler import SampleSettings

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
    from trainer.evaluation.distributed import RankShare
    from trainer.evaluation.prompts import read_prompt_set
    from trainer.sampling.sampler import Sampler

    prompts = read_prompt_set(cfg.get("prompts"), cfg.get("prompt_file"), cfg.get("prompt_shards"), cfg.max_prompts)
    prompts = [p for p in prompts for _ in range(cfg.num_images_per_prompt)]
    seeds = [cfg.seed + i for i in range(len(prompts))]
    evaluator.check_count(len(prompts))
    settings = _settings(cfg)  # bad settings fail before any model loads
    local = local_inputs(cfg, MODEL_INPUTS, DOWNLOAD_CACHE_KEY)
    sampler = Sampler.load(
        local["model_dir"],
        device=str(fabric.device),
        dtype=cfg.dtype,
        weights=cfg.weights,
        vae_path=local["vae_path"],
        text_encoder_path=local["text_encoder_path"],
        tokenizer_path=local["tokenizer_path"],
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


def images_folder(images_dir: str, cache_dir: str | None) -> Path:
    """``images_dir`` itself when local; for a URL its copy in the download cache (downloaded once).

    Raises:
        ObjectStoreError: nothing is under the URL (one line naming it).
    """
    return local_copy(images_dir, cache_dir, "a folder of images (lf-sample's or lf-eval's)")


def _existing_images(cfg: DictConfig, evaluator: ImageEvaluator) -> dict[str, Any]:
    """This rank's share of the images in ``images_dir`` (their prompts from their PNG parameters), but
    ``grid.png``."""
    from trainer.evaluation.distributed import RankShare
    from trainer.evaluation.reference import IMAGE_SUFFIXES

    given = str(cfg.images_dir)
    folder = images_folder(given, cfg.get(DOWNLOAD_CACHE_KEY))
    found = folder.glob("*") if folder.is_dir() else []
    paths = sorted(p for p in found if p.suffix.lower() in IMAGE_SUFFIXES and p.name != GRID_NAME)
    if not paths:
        raise DataError(f"{given}: images_dir holds no images ({', '.join(IMAGE_SUFFIXES)})")
    prompts = None
    if evaluator.clip is not None:  # every rank reads every prompt, so all agree before scoring
        prompts = []
        for path in paths:
            shown = object_store.join(given, path.name)  # the image as the user named it, not its cached copy
            text = read_parameters(path) if path.suffix.lower() == ".png" else ""
            if not text:
                raise DataError(f"{shown}: no 'parameters' text chunk with the prompt, which the CLIP score needs")
            prompts.append(parse_parameters(text, source=shown).prompt)
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
    out_dir = str(cfg.out_dir)
    object_store.require_writable(out_dir, "an existing bucket for out_dir")  # before minutes of work
    from trainer.evaluation.evaluator import gather_images

    fabric = _launch(cfg)
    evaluator = _evaluator(cfg).to(fabric.device)
    with staged_output(out_dir, replace=False) as out:  # a URL: each rank uploads what it wrote, when done
        out.mkdir(parents=True, exist_ok=True)
        made = _generate(cfg, fabric, evaluator, out) if cfg.get("model_dir") else _existing_images(cfg, evaluator)
        start = time.perf_counter()
        metrics = evaluator.evaluate(made["share"], made["images"], made["prompts"])
        made["seconds"]["metrics"] = time.perf_counter() - start
        grid_images = gather_images(made["share"], made["images"], cfg.grid_images)
        grid = fabric.global_rank == 0 and len(grid_images) > 1
        if grid:
            columns = cfg.num_images_per_prompt if made["model"] and cfg.num_images_per_prompt > 1 else 8
            image_grid(grid_images, columns=min(columns, len(grid_images))).save(out / GRID_NAME)
    fabric.barrier()  # every rank's images are in out_dir before eval.json, written last, says the run is done
    reference = evaluator.reference_features
    result: dict[str, Any] = {
        **metrics,
        "model": made["model"],
        "images_dir": object_store.join(out_dir, "images") if made["model"] else str(cfg.images_dir),
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
        "out_dir": out_dir,
        "grid": object_store.join(out_dir, GRID_NAME) if grid else None,
    }
    if fabric.global_rank == 0:
        record = {**result, "config": OmegaConf.to_container(cfg, resolve=True)}
        text = json.dumps(record, indent=2, sort_keys=True) + "\n"
        object_store.write_path(object_store.join(out_dir, RESULT_NAME), text.encode("utf-8"))  # atomic; one PUT
        print("\n".join(metrics_table(result)))
        print(f"eval: {RESULT_NAME}, images and grid -> {out_dir}")
    return result


@lf_command("eval")
def main(cfg: DictConfig) -> None:
    """Console entry point."""
    run_eval(cfg)


if __name__ == "__main__":
    main()
