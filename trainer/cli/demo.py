"""``lf-demo``: the whole job on the digits, end to end, printing each stage's wall time, the
conditional accuracy of the generated digits and their FID against the real held-out digits (in the
digits classifier's features: the metric path of ``lf-eval`` on real data, offline).

Every stage runs the same ``run_*`` function its command runs, with the config its command
would compose (``conf/<stage>.yaml``) plus the overrides in ``conf/demo.yaml``.

Examples::

    lf-demo                                    # writes demo_out/
    lf-demo out_dir=/tmp/demo samples_per_prompt=5
    lf-demo train_steps=1500 out_dir=/tmp/demo-1500
    lf-demo train_model=sdxl_tiny out_dir=/tmp/demo-sdxl  # SDXL-shaped: two text encoders
    lf-demo train_model=sdxl_tiny vae_from=demo_out/base/vae out_dir=/tmp/demo-sdxl  # reuse an autoencoder

Keys::

    out_dir             where every stage writes (demo_out)
    train_model         the UNet config: tiny, or sdxl_tiny (then the base folder has SDXL's two text encoders)
    train_steps         UNet training steps
    autoencoder_steps   VAE training steps
    vae_from            a VAE folder of an earlier demo (OUT/base/vae): copied instead of training one
    samples_per_prompt  images per digit prompt for the accuracy
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf

from data_pipelines.raw.sources.digits import digit_caption, digit_to_image, digits_split
from lf_common.atomic import write_json_atomic
from lf_common.errors import DataError
from trainer.cli.command import lf_command
from trainer.cli.eval import run_eval
from trainer.cli.export import run_export
from trainer.cli.hydra_app import compose_config
from trainer.cli.precompute import run_precompute
from trainer.cli.sample import run_sample
from trainer.cli.shards import run_shards
from trainer.cli.train import run_train
from trainer.cli.train_autoencoder import run_train_autoencoder
from trainer.diffusion.unet_kinds import is_sdxl_unet
from trainer.evaluation.digits_accuracy import DigitsClassifier, conditional_accuracy

SUMMARY_NAME = "demo_summary.json"


class StageTimer:
    """Runs stages, printing and recording each one's wall time."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def run(self, name: str, stage: Callable[[], Any]) -> Any:
        print(f"== {name} ==", flush=True)
        start = time.perf_counter()
        result = stage()
        self.seconds[name] = round(time.perf_counter() - start, 2)
        print(f"== {name}: {self.seconds[name]:.1f} s", flush=True)
        return result


def run_demo(cfg: DictConfig) -> dict[str, Any]:
    """Run every stage; returns timings, accuracy and output paths (also in ``demo_summary.json``)."""
    stages = OmegaConf.to_container(cfg.stages, resolve=True)
    out = Path(cfg.out_dir)
    timer = StageTimer()
    start = time.perf_counter()
    shards = timer.run("shards", lambda: run_shards(compose_config("shards", stages["shards"])))
    timer.run("heldout_shards", lambda: run_shards(compose_config("shards", stages["heldout_shards"])))
    timer.run("text_encoder", lambda: save_text_encoders(out / "base", cfg, stages["train"]))
    if cfg.vae_from:
        autoencoder = timer.run("autoencoder", lambda: copy_vae(Path(cfg.vae_from), out / "base" / "vae"))
    else:
        autoencoder = timer.run(
            "autoencoder", lambda: run_train_autoencoder(compose_config("train_autoencoder", stages["autoencoder"]))
        )
    timer.run("precompute", lambda: run_precompute(compose_config("precompute", stages["precompute"])))
    train = timer.run("train", lambda: run_train(compose_config("train", stages["train"])))
    timer.run("export", lambda: run_export(compose_config("export", stages["export"])))
    prompts = [digit_caption(label) for label in range(10)]
    samples = timer.run(
        "sample", lambda: run_sample(compose_config("sample", [*stages["sample"], f"prompts={json.dumps(prompts)}"]))
    )
    classifier = timer.run("classifier", DigitsClassifier)
    accuracy = conditional_accuracy(classifier, samples["images"], samples["prompts"])
    scores = timer.run("eval", lambda: run_eval(compose_config("eval", stages["eval"])))
    total = round(time.perf_counter() - start, 2)
    summary = {
        "conditional_accuracy": accuracy,
        "classifier_heldout_accuracy": classifier.heldout_accuracy(),
        "fid": scores["fid"],
        "kid": scores["kid"],
        "fid_real_digits": real_digits_fid(len(samples["images"]), samples["images"][0].size[0]),
        "num_generated": len(samples["images"]),
        "stage_seconds": timer.seconds,
        "total_seconds": total,
        "train_samples": shards["samples"],
        "train_steps": train["global_step"],
        "train_loss": train.get("train/loss"),
        "vae_scaling_factor": autoencoder.get("scaling_factor"),
        "grid": samples["grid"],
        "export": str(out / "export"),
    }
    write_json_atomic(out / SUMMARY_NAME, summary)
    print("\nstage            seconds")
    for name, seconds in timer.seconds.items():
        print(f"{name:<16} {seconds:7.1f}")
    print(f"{'total':<16} {total:7.1f}")
    print(f"\nconditional accuracy: {accuracy:.3f} over {len(samples['images'])} generated digits (chance 0.100)")
    print(f"classifier accuracy on real held-out digits: {summary['classifier_heldout_accuracy']:.3f}")
    print(
        f"FID {summary['fid']:.3f} (KID {summary['kid']:.4f}) against the {int(scores['num_reference'])} held-out "
        f"digits, in the digits classifier's features; {summary['fid_real_digits']:.3f} for as many real digits"
    )
    print(f"grid: {samples['grid']}")
    return summary


def copy_vae(source: Path, target: Path) -> dict[str, Any]:
    """Copy an earlier demo's VAE folder into this demo's base folder; returns its ``scaling_factor`` as the
    autoencoder stage does.

    Raises:
        DataError: ``source`` is not a diffusers VAE folder (no ``config.json``).
    """
    config = source / "config.json"
    if not config.is_file():
        raise DataError(f"vae_from={source}: no config.json there; give an earlier demo's OUT/base/vae folder")
    shutil.copytree(source, target, dirs_exist_ok=True)
    return {"scaling_factor": json.loads(config.read_text()).get("scaling_factor")}


def save_text_encoders(base: Path, cfg: DictConfig, train_overrides: list[str]) -> None:
    """The base folder's tiny text encoder, or SDXL's two when the trained UNet takes SDXL's conditioning."""
    from trainer.tiny_models.tiny_sdxl_text_encoders import save_tiny_sdxl_text_encoders
    from trainer.tiny_models.tiny_text_encoder import save_tiny_text_encoder

    unet = compose_config("train", train_overrides).model.unet
    if is_sdxl_unet(unet):
        save_tiny_sdxl_text_encoders(base, **cfg.text_encoder)
    else:
        save_tiny_text_encoder(base, **cfg.text_encoder)


def real_digits_fid(count: int, size: int) -> float:
    """FID of ``count`` real training digits, as many of each digit as the demo generates, against the
    held-out ones: about what a perfect generator scores at this sample size (FID is biased upwards
    for small sets)."""
    from trainer.evaluation.digits_features import DigitsFeatures
    from trainer.evaluation.distance import frechet_distance
    from trainer.evaluation.features import images_to_tensor

    features = DigitsFeatures(size=size)
    digits, labels, _ = digits_split("train")
    balanced = np.concatenate([np.flatnonzero(labels == label)[: count // 10] for label in range(10)])
    train = [digit_to_image(d, size) for d in digits[balanced]]
    heldout = [digit_to_image(d, size) for d in digits_split("heldout")[0]]
    return frechet_distance(features(images_to_tensor(heldout)), features(images_to_tensor(train)))


@lf_command("demo")
def main(cfg: DictConfig) -> None:
    """Console entry point."""
    run_demo(cfg)


if __name__ == "__main__":
    main()
