"""The run ``lf-train`` and ``lf-train-autoencoder`` share: build, resume, fit, summarize.

:func:`fit_from_config` checks the precision, seeds, builds the data module and the module from their
config groups, resolves the resume once (:func:`trainer.checkpoint.resume.resume_checkpoint`: ``ckpt_path``,
``auto_resume``, a damaged checkpoint passed over, a checkpoint in a bucket downloaded), builds the trainer with
its callbacks, loggers and strategy (:func:`trainer.cli.hydra_app.build_trainer`), fits, and returns the final
metrics with the newest checkpoint and the step. What a command does before or after (a sweep's trial record,
the autoencoder's scaling factor and export) stays in its own module.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from lf_common import object_store
from trainer.cli.hydra_app import build_trainer, finishing_loggers, optimizer_factories
from trainer.strategies.optimizer_support import check_optimizer, optimizer_family
from trainer.strategies.precision import check_precision

if TYPE_CHECKING:  # Lightning and torch are imported when a run starts (trainer.cli imports no framework)
    import lightning as L
    from lightning.pytorch.callbacks import Callback

log = logging.getLogger(__name__)


@dataclass
class FitRun:
    """What a fitted run leaves: the trainer, the module and data module it fitted, and its final metrics
    (floats, plus ``checkpoint``: the newest checkpoint, absolute or a URL, ``""`` when none; ``global_step``)."""

    trainer: L.Trainer
    module: L.LightningModule
    datamodule: L.LightningDataModule
    metrics: dict[str, Any]


def resume_from_config(cfg: DictConfig) -> tuple[str | None, str | None]:
    """The run's resume (:func:`trainer.checkpoint.resume.resume_checkpoint`) from its ``ckpt_path``,
    ``auto_resume``, ``callbacks.model_checkpoint.dirpath`` and ``output_dir`` (a copy from a bucket goes to
    ``<output_dir>/checkpoint-cache``).

    Returns:
        The local checkpoint to give Lightning (``None``: start afresh), and the URL it was downloaded from.
    """
    from trainer.checkpoint.resume import CHECKPOINT_CACHE, resume_checkpoint

    return resume_checkpoint(
        cfg.get("ckpt_path"),
        OmegaConf.select(cfg, "callbacks.model_checkpoint.dirpath"),
        bool(cfg.get("auto_resume")),
        Path(cfg.output_dir) / CHECKPOINT_CACHE,
    )


def log_own_schedule(cfg: DictConfig) -> None:
    """Say in one line that a schedule-free optimizer runs under the constant LR scheduler, which its option chose
    (``conf/optim/schedule_free_adamw.yaml``), and where its own warm-up is set."""
    if optimizer_family(str(cfg.optim.get("_target_", ""))) == "schedule_free":
        log.info(
            "optim (%s) warms up by itself (optim.warmup_steps=%s) and has no decay schedule: lr_scheduler=constant",
            cfg.optim._target_,
            cfg.optim.get("warmup_steps"),
        )


def fit_from_config(
    cfg: DictConfig, module_key: str, monitors: list[Callback] | None = None, param_groups: bool = False
) -> FitRun:
    """Build the run ``cfg`` describes, resume it when asked, fit it, and summarize it.

    Args:
        cfg: the command's config (``trainer``, ``data``, ``optim``, ``seed``, ``output_dir``, ``ckpt_path``,
            ``auto_resume``, ``callbacks``, ``logger``, ``strategy``).
        module_key: the config group the LightningModule is built from (``model``, ``autoencoder``).
        monitors: the command's own callbacks, before the shared ones (skipped samples, RNG state).
        param_groups: whether the module takes ``cfg.optim``'s per-part settings (``unet_lr``, ``block_lr``, ...:
            :func:`trainer.cli.hydra_app.optimizer_factories`).
    """
    check_precision(cfg.trainer)
    check_optimizer(cfg)
    log_own_schedule(cfg)
    import lightning as L

    from data_pipelines.loading.monitoring import SkippedSamplesMonitor
    from trainer.callbacks.resumed_from_bucket import ResumedFromBucket
    from trainer.callbacks.rng import RNGState
    from trainer.strategies.gpu_defaults import apply_matmul_precision

    apply_matmul_precision(cfg)
    L.seed_everything(cfg.seed, workers=True)
    # The data may exist only once the data module's setup has run inside fit (DreamBooth prepares it on
    # every rank there): the module and Provenance take the empty caption and the manifest from it then.
    datamodule = instantiate(cfg.data)
    module = instantiate(cfg[module_key], **optimizer_factories(cfg, param_groups=param_groups))
    if module_key == "model":
        from trainer.cli.plan_run import log_plan

        log_plan(cfg, module)  # the figures lf-train plan=true prints, for this run's own module
    callbacks = [*(monitors or []), SkippedSamplesMonitor(datamodule.sample_counts), RNGState()]
    ckpt_path, resumed_url = resume_from_config(cfg)
    if resumed_url is not None:
        callbacks.append(ResumedFromBucket(resumed_url, ckpt_path))  # kept there; the copy removed once loaded
    trainer = build_trainer(cfg, callbacks)
    with finishing_loggers(trainer):
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    metrics: dict[str, Any] = {k: float(v) for k, v in trainer.callback_metrics.items()}
    checkpoint = trainer.checkpoint_callback.last_model_path if trainer.checkpoint_callback else ""
    metrics.update(checkpoint=object_store.canonical(checkpoint) if checkpoint else "", global_step=trainer.global_step)
    log.info("training done at step %d; checkpoint %s", trainer.global_step, metrics["checkpoint"] or "none")
    return FitRun(trainer, module, datamodule, metrics)
