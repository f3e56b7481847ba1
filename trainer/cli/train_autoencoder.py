"""``lf-train-autoencoder``: train or fine-tune the first-stage VAE on raw shards.

The result is saved in diffusers layout (``save_dir``), with ``scaling_factor`` set so that the
latents of the training images have unit standard deviation (as SD's 0.18215 does for its VAE).

Examples::

    lf-train-autoencoder data.shards=shards/ save_dir=base/vae trainer.max_steps=3000
    lf-train-autoencoder autoencoder=sd data.shards=data/raw data.resolution=256 trainer.precision=bf16-mixed
    lf-train-autoencoder data.shards=shards/ ckpt_path=outputs/train_autoencoder/.../checkpoints/last.ckpt  # resume

Keys::

    data.shards        the raw shards to train on (lf-shards' out_dir; s3://... too)
    s3_endpoint_url    an S3-compatible store's endpoint (default: AWS_ENDPOINT_URL_S3, else AWS)
    ckpt_path          resume: a checkpoint (s3://... too), or last with callbacks.model_checkpoint.dirpath=s3://...
    data.resolution    square side of the training crops
    trainer.max_steps  optimizer steps to train
    save_dir           where the trained VAE goes (diffusers layout; s3://... too: uploaded, config.json last)
"""

from __future__ import annotations

import logging
from itertools import islice
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from lf_common import object_store
from lf_common.atomic import atomic_path
from lf_common.staged_output import staged_output
from trainer.checkpoint.remote import CHECKPOINT_CACHE, choose_remote_checkpoint
from trainer.checkpoint.resume import LAST_NAME
from trainer.cli.command import lf_command
from trainer.strategies.precision import check_precision

log = logging.getLogger(__name__)


def run_train_autoencoder(cfg: DictConfig) -> dict[str, Any]:
    """Train the autoencoder, set its scaling factor, save it in diffusers layout.

    Returns:
        Final metrics, ``scaling_factor`` and ``save_dir``.
    """
    check_precision(cfg.trainer)  # refused at config time: before the heavy imports
    import lightning as L
    from hydra.utils import instantiate

    from data_pipelines.loading.monitoring import SkippedSamplesMonitor
    from trainer.callbacks.resumed_from_bucket import ResumedFromBucket
    from trainer.callbacks.rng import RNGState
    from trainer.cli.hydra_app import build_trainer, optimizer_factories
    from trainer.strategies.gpu_defaults import apply_matmul_precision

    apply_matmul_precision(cfg)
    L.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate(cfg.data)
    module = instantiate(cfg.autoencoder, **optimizer_factories(cfg))
    ckpt_path, resumed_url = _resume_from(cfg)
    monitors = [SkippedSamplesMonitor(datamodule.sample_counts), RNGState()]  # RNG in checkpoints: exact resume
    if resumed_url is not None:
        monitors.append(ResumedFromBucket(resumed_url, ckpt_path))  # kept there; the copy removed once loaded
    trainer = build_trainer(cfg, monitors)
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    metrics: dict[str, Any] = {k: float(v) for k, v in trainer.callback_metrics.items()}
    if trainer.is_global_zero:
        batches = [b["pixels"] for b in islice(iter(datamodule.train_dataloader()), cfg.scaling_batches)]
        std = module.cpu().latent_std(batches)
        scaling_factor = 1.0 / std
        module.vae.register_to_config(scaling_factor=scaling_factor)
        with staged_output(cfg.save_dir, last=("config.json",)) as local, atomic_path(local) as tmp:
            module.vae.save_pretrained(tmp, safe_serialization=True)  # a URL: uploaded, config.json last
        log.info("saved VAE to %s (latent std %.4f, scaling_factor %.4f)", cfg.save_dir, std, scaling_factor)
        metrics["scaling_factor"] = scaling_factor
    metrics["save_dir"] = cfg.save_dir if object_store.is_url(cfg.save_dir) else str(Path(cfg.save_dir).resolve())
    return metrics


def _resume_from(cfg: DictConfig) -> tuple[str | None, str | None]:
    """``ckpt_path`` as given, or, for one in a bucket (a URL, or ``last`` with the checkpoint folder in a
    bucket), the local copy of the newest complete remote checkpoint (as ``lf-train`` resumes) and its URL."""
    wanted = cfg.get("ckpt_path")
    folder = OmegaConf.select(cfg, "callbacks.model_checkpoint.dirpath")
    if wanted and (object_store.is_url(wanted) or (wanted == LAST_NAME and object_store.is_url(folder or ""))):
        url, copy = choose_remote_checkpoint(wanted, folder, Path(cfg.output_dir) / CHECKPOINT_CACHE)
        return copy, url
    return wanted, None


@lf_command("train_autoencoder")
def main(cfg: DictConfig) -> None:
    """Console entry point."""
    run_train_autoencoder(cfg)


if __name__ == "__main__":
    main()
