"""``lf-train-autoencoder``: train or fine-tune the first-stage VAE on raw shards.

The result is saved in diffusers layout (``save_dir``), with ``scaling_factor`` set so that the
latents of the training images have unit standard deviation (as SD's 0.18215 does for its VAE).

Examples::

    lf-train-autoencoder data.shards=shards/ save_dir=base/vae trainer.max_steps=3000
    lf-train-autoencoder autoencoder=sd data.shards=data/raw data.resolution=256 trainer.precision=bf16-mixed
    lf-train-autoencoder data.shards=shards/ ckpt_path=outputs/train_autoencoder/.../checkpoints/last.ckpt  # resume
    lf-train-autoencoder data.shards=shards/ auto_resume=true output_dir=outputs/train_autoencoder/<run>  # requeue

Keys::

    data.shards        the raw shards to train on (lf-shards' out_dir; s3://... too)
    s3_endpoint_url    an S3-compatible store's endpoint (default: AWS_ENDPOINT_URL_S3, else AWS)
    ckpt_path          resume: a checkpoint, a folder of them, or last (the newest complete one); s3://... too
    auto_resume        true: resume from the newest complete checkpoint when the run has one, else start
    data.resolution    square side of the training crops
    trainer.max_steps  optimizer steps to train
    save_dir           where the trained VAE goes (diffusers layout; s3://... too: uploaded, config.json last)
"""

from __future__ import annotations

import logging
from itertools import islice
from typing import Any

from omegaconf import DictConfig

from lf_common import object_store
from lf_common.atomic import atomic_path
from lf_common.staged_output import staged_output
from trainer.cli.command import lf_command
from trainer.strategies.precision import check_precision

log = logging.getLogger(__name__)


def run_train_autoencoder(cfg: DictConfig) -> dict[str, Any]:
    """Train the autoencoder (:func:`trainer.cli.fit_run.fit_from_config`), set its scaling factor, save it in
    diffusers layout.

    Returns:
        Final metrics, ``checkpoint``, ``global_step``, ``scaling_factor`` and ``save_dir``.
    """
    check_precision(cfg.trainer)  # refused at config time: before the heavy imports
    check_no_part_settings(cfg.optim)
    from trainer.cli.fit_run import fit_from_config

    run = fit_from_config(cfg, "autoencoder")
    metrics = run.metrics
    if run.trainer.is_global_zero:
        batches = [b["pixels"] for b in islice(iter(run.datamodule.train_dataloader()), cfg.scaling_batches)]
        std = run.module.cpu().latent_std(batches)
        scaling_factor = 1.0 / std
        run.module.vae.register_to_config(scaling_factor=scaling_factor)
        with staged_output(cfg.save_dir, last=("config.json",)) as local, atomic_path(local) as tmp:
            run.module.vae.save_pretrained(tmp, safe_serialization=True)  # a URL: uploaded, config.json last
        log.info("saved VAE to %s (latent std %.4f, scaling_factor %.4f)", cfg.save_dir, std, scaling_factor)
        metrics["scaling_factor"] = scaling_factor
    metrics["save_dir"] = object_store.canonical(cfg.save_dir)
    return metrics


def check_no_part_settings(optim: DictConfig) -> None:
    """Refuse lf-train's per-part optimizer keys (``optim.unet_lr``, ``optim.block_lr``, ...): the VAE trains as one
    parameter group, so they would be ignored.

    Raises:
        ConfigError: naming the keys given and ``optim.lr``, which applies.
    """
    from lf_common.errors import ConfigError
    from trainer.modules.param_groups import GROUP_KEYS

    given = [f"optim.{key}" for key in GROUP_KEYS if optim.get(key) is not None]
    if given:
        raise ConfigError(
            f"{', '.join(given)}: lf-train-autoencoder trains the VAE as one parameter group and would ignore "
            "per-part settings; set optim.lr and optim.weight_decay"
        )


@lf_command("train_autoencoder")
def main(cfg: DictConfig) -> None:
    """Console entry point."""
    run_train_autoencoder(cfg)


if __name__ == "__main__":
    main()
