"""``lf-train``: train the UNet on latent shards.

Examples::

    lf-train data.train_dir=latents/ trainer.max_steps=2000
    lf-train experiment=demo_digits data.train_dir=demo_out/latents
    lf-train strategy=ddp trainer.devices=2
    lf-train strategy=deepspeed_stage_2 trainer.devices=8 trainer.precision=bf16-mixed
    lf-train -m optim.lr=1e-4,3e-4                      # a two-trial Hydra sweep
    lf-train -m hparams_search=lr_optuna data.train_dir=... data.val_dir=...   # Optuna (TPE)
    lf-train ckpt_path=outputs/train/.../checkpoints/last.ckpt   # resume
    lf-train ckpt_path=last output_dir=outputs/train/<run>       # resume from the newest complete checkpoint
    lf-train auto_resume=true output_dir=outputs/train/<run>     # resume when it has a checkpoint, else start
    lf-train callbacks.model_checkpoint.dirpath=s3://bucket/run/checkpoints auto_resume=true  # checkpoints in a bucket

A SIGTERM or SIGUSR1 (a preemption) ends the run after the current optimizer step with a complete
checkpoint and exit status 75 (``EX_TEMPFAIL``): run the same command again (with ``auto_resume=true``,
as the launchers pass it) and it continues from there.

Keys::

    data.train_dir         the latent shards to train on (lf-precompute's out_dir; s3://... too)
    s3_endpoint_url        an S3-compatible store's endpoint (default: AWS_ENDPOINT_URL_S3, else AWS)
    data.val_dir           latent shards for val/loss (optional)
    trainer.max_steps      optimizer steps to train
    data.batch_size        batch size per device
    optim.lr               learning rate
    model.pretrained       model=pretrained: the diffusers folder to fine-tune (lf-import's out_dir)
    ckpt_path              resume: a checkpoint, a folder of them, or last (s3://... too)
    output_dir             where logs go (local), and checkpoints unless callbacks.model_checkpoint.dirpath says
    callbacks.model_checkpoint.dirpath   the checkpoint folder; s3://bucket/run/checkpoints: staged, then uploaded
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from lf_common import object_store
from trainer.checkpoint.remote import CHECKPOINT_CACHE, choose_remote_checkpoint, has_remote_checkpoints
from trainer.checkpoint.resume import LAST_NAME, auto_resume_checkpoint, resolve_resume_checkpoint
from trainer.cli.command import lf_command
from trainer.strategies.precision import check_precision

log = logging.getLogger(__name__)


def register_sweeper_plugin() -> None:
    """Register the resumable Optuna sweeper with Hydra by name (``Plugins.register``, Hydra's public
    way). Hydra finds plugins by listing the ``hydra_plugins`` namespace, and under an editable
    install setuptools' import hook imports ``hydra_plugins.latentforge_sweepers`` without listing
    it there, so ``hparams_search=lr_optuna`` failed with "Unknown plugin class"."""
    from hydra.core.plugins import Plugins

    from hydra_plugins.latentforge_sweepers.resumable_optuna import ResumableOptunaSweeper

    Plugins.instance().register(ResumableOptunaSweeper)


def register_sweeper_for_multirun() -> None:
    """``lf-train``'s setup (run by its ``main``): register the sweeper plugin when the command line asks
    for a multirun (``-m``, ``--multirun``, ``hydra.mode=MULTIRUN``), the only time Hydra builds a sweeper.
    The plugin imports Optuna, torch and Lightning, which ``--help`` and a config error do without."""
    if multirun_asked(sys.argv[1:]):
        register_sweeper_plugin()


def multirun_asked(args: list[str]) -> bool:
    """Whether a command line asks Hydra for a multirun."""
    return any(arg in ("-m", "--multirun") or arg.replace(" ", "").upper() == "HYDRA.MODE=MULTIRUN" for arg in args)


def run_train(cfg: DictConfig) -> dict[str, Any]:
    """Train a LatentDiffusion module as ``cfg`` describes.

    Returns:
        The final logged metrics (floats), ``optimized_metric`` (the value of
        ``cfg.optimized_metric``), ``checkpoint`` (the newest checkpoint path) and ``global_step``.
    """
    check_precision(cfg.trainer)  # refused at config time: before the heavy imports
    import lightning as L
    from hydra.utils import instantiate

    from data_pipelines.loading.monitoring import SkippedSamplesMonitor
    from trainer.callbacks.provenance import Provenance
    from trainer.callbacks.resumed_from_bucket import ResumedFromBucket
    from trainer.callbacks.rng import RNGState
    from trainer.cli.hydra_app import build_trainer, finishing_loggers, optimizer_factories, resolved_container
    from trainer.strategies.gpu_defaults import apply_matmul_precision

    apply_matmul_precision(cfg)
    L.seed_everything(cfg.seed, workers=True)
    # The data may exist only once the data module's setup has run inside fit (DreamBooth prepares it on
    # every rank there): the module and Provenance take the empty caption and the manifest from it then.
    datamodule = instantiate(cfg.data)
    module = instantiate(cfg.model, **optimizer_factories(cfg))
    monitors = [
        Provenance(resolved_container(cfg)),
        SkippedSamplesMonitor(datamodule.sample_counts),
        RNGState(),
    ]
    ckpt_path, resumed_url = resume_checkpoint(cfg)
    if resumed_url is not None:
        monitors.append(ResumedFromBucket(resumed_url, ckpt_path))  # kept there; the copy removed once loaded
    trainer = build_trainer(cfg, monitors)
    with finishing_loggers(trainer):
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    metrics: dict[str, Any] = {k: float(v) for k, v in trainer.callback_metrics.items()}
    checkpoint = trainer.checkpoint_callback.last_model_path if trainer.checkpoint_callback else ""
    metrics.update(
        optimized_metric=metrics.get(cfg.get("optimized_metric") or "", float("nan")),
        checkpoint=checkpoint if not checkpoint or object_store.is_url(checkpoint) else str(Path(checkpoint).resolve()),
        global_step=trainer.global_step,
    )
    log.info("training done at step %d; checkpoint %s", trainer.global_step, metrics["checkpoint"])
    return metrics


def resume_checkpoint(cfg: DictConfig) -> tuple[str | None, str | None]:
    """The checkpoint this run resumes from: ``ckpt_path`` when given; else, with ``auto_resume``, the newest
    complete checkpoint of the run's checkpoint folder, or none when that holds no checkpoint (a fresh run).

    A checkpoint folder or ``ckpt_path`` in a bucket (``s3://...``): the chosen checkpoint is downloaded to
    ``<output_dir>/checkpoint-cache`` (:func:`trainer.checkpoint.remote.choose_remote_checkpoint`) and
    resumed from there.

    Returns:
        The local checkpoint to give Lightning (``None``: start afresh), and the URL it was downloaded from
        (``None`` when it is not a copy).
    """
    folder = OmegaConf.select(cfg, "callbacks.model_checkpoint.dirpath")
    wanted = cfg.get("ckpt_path")
    remote = object_store.is_url(folder) if folder else False
    if not wanted and cfg.get("auto_resume"):
        wanted = (LAST_NAME if has_remote_checkpoints(folder) else None) if remote else auto_resume_checkpoint(folder)
        if wanted is None:
            log.info("auto_resume: no checkpoint in %s; starting at step 0", folder)
    if wanted and (object_store.is_url(wanted) or (wanted == LAST_NAME and remote)):
        url, copy = choose_remote_checkpoint(wanted, folder, Path(cfg.output_dir) / CHECKPOINT_CACHE)
        return copy, url
    return resolve_resume_checkpoint(wanted, folder), None


@lf_command("train", setup=register_sweeper_for_multirun)
def main(cfg: DictConfig) -> float | None:
    """Console entry point; in a sweep, returns the optimized metric for Hydra's sweepers.

    A sweep's trial (a multirun job, or a run of a W&B sweep agent) records itself in ``trial.json``
    in its output folder, and a diverged, out-of-memory or pruned trial returns NaN instead of
    stopping a multirun. A plain run just trains. A preempted run exits with status 75
    (``@lf_command``: :mod:`trainer.cli.preempted`).
    """
    check_precision(cfg.trainer)  # a refused combination answers before the imports of a run (torch, Lightning)
    from trainer.sweeps.trial import in_sweep, run_trial

    hydra_cfg = HydraConfig.get()
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    if not in_sweep(multirun):
        run_train(cfg)
        return None
    return run_trial(
        lambda: run_train(cfg),
        metric=cfg.optimized_metric,
        direction=cfg.optimized_direction,
        output_dir=hydra_cfg.runtime.output_dir,
        overrides=list(hydra_cfg.overrides.task),
        number=hydra_cfg.job.num if multirun else None,
        catch_failures=multirun,
    )


if __name__ == "__main__":
    main()
