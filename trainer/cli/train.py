"""``lf-train``: train the UNet on latent shards.

Examples::

    lf-train data.train_dir=latents/ trainer.max_steps=2000
    lf-train experiment=demo_digits data.train_dir=demo_out/latents
    lf-train data=mixed 'data.datasets=[{path:latents/subject,repeats:10},{path:latents/reg,is_reg:true}]'
    lf-train data=images_online data.shards=raw/ data.pretrained=sd15/ model=pretrained model.pretrained=sd15/
    lf-train strategy=ddp trainer.devices=2
    lf-train strategy=deepspeed_stage_2 trainer.devices=8 trainer.precision=bf16-mixed
    lf-train -m optim.lr=1e-4,3e-4                      # a two-trial Hydra sweep
    lf-train -m hparams_search=lr_optuna data.train_dir=... data.val_dir=...   # Optuna (TPE)
    lf-train ckpt_path=outputs/train/.../checkpoints/last.ckpt   # resume
    lf-train ckpt_path=last output_dir=outputs/train/<run>       # resume from the newest complete checkpoint
    lf-train auto_resume=true output_dir=outputs/train/<run>     # resume when it has a checkpoint, else start
    lf-train callbacks.model_checkpoint.dirpath=s3://bucket/run/checkpoints auto_resume=true  # checkpoints in a bucket
    lf-train plan=true experiment=sdxl_full_24gb plan.base=sdxl plan.device_memory_gb=24   # will it fit? (no data)

A SIGTERM or SIGUSR1 (a preemption) ends the run after the current optimizer step with a complete
checkpoint and exit status 75 (``EX_TEMPFAIL``): run the same command again (with ``auto_resume=true``,
as the launchers pass it) and it continues from there.

Keys::

    data.train_dir         the latent shards to train on (lf-precompute's out_dir; s3://... too)
    s3_endpoint_url        an S3-compatible store's endpoint (default: AWS_ENDPOINT_URL_S3, else AWS)
    data.val_dir           latent shards for val/loss (optional)
    data.datasets          data=mixed: several folders, each {path, repeats|weight, is_reg, name, caption_dropout}
    trainer.max_steps      optimizer steps to train
    data.batch_size        batch size per device
    data.random_flip       draw the stored mirror images (lf-precompute flip=true); false for text, digits
    data.use_crop_variants  draw the stored random crops (lf-precompute crops_per_image)
    optim.lr               learning rate
    objective.masked_loss  weigh the loss by each image's loss mask (KEY.mask.png); objective.mask_floor: the rest's
    model.objective.loss_type  l2 | l1 | huber | smooth_l1 (objective=huber_snr: kohya's scheduled Huber)
    model.objective.multires_noise_iterations  pyramid noise levels (0: off; 6-10 as kohya)
    model.pretrained       model=pretrained: the diffusers folder to fine-tune (lf-import's out_dir)
    model.train_text_encoder  true: the text encoder(s) train too (shards of lf-precompute keep_token_ids=true)
    ckpt_path              resume: a checkpoint, a folder of them, or last (s3://... too)
    output_dir             where logs go (local), and checkpoints unless callbacks.model_checkpoint.dirpath says
    callbacks.model_checkpoint.dirpath   the checkpoint folder; s3://bucket/run/checkpoints: staged, then uploaded
    plan                   true: print the memory plan per rank (weights, gradients, optimizer state, EMA,
                           activations) and exit; plan.device_memory_gb=24: and whether it fits (docs/memory.md)
"""

from __future__ import annotations

import logging
import sys
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

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


def train_setup() -> None:
    """``lf-train``'s setup (run by its ``main``, before Hydra composes): the plan switch and the sweeper plugin."""
    sys.argv[1:] = plan_switch(sys.argv[1:])
    register_sweeper_for_multirun()


def plan_switch(args: list[str]) -> list[str]:
    """``plan=true`` (or ``false``) as ``plan.enabled=true``: ``plan`` is a group of keys (``plan.device_memory_gb``,
    ...), and Hydra would replace the whole of it by the boolean, losing the others."""
    return [
        f"plan.enabled={arg.split('=', 1)[1]}" if arg.lower() in ("plan=true", "plan=false") else arg for arg in args
    ]


def planning(cfg: DictConfig) -> bool:
    """Whether the command line asks for the memory plan only (``plan=true``)."""
    from omegaconf import OmegaConf

    return bool(OmegaConf.select(cfg, "plan.enabled", default=False))


def data_not_needed(cfg: DictConfig) -> tuple[str, ...]:
    """The keys a plan (``plan=true``) leaves ``???``: the data's (the plan reads no data) and ``model.pretrained``
    with ``plan.base``."""
    from omegaconf import OmegaConf

    if not planning(cfg):
        return ()
    keys = tuple(f"data.{key}" for key in cfg.data)
    return (*keys, "model.pretrained") if OmegaConf.select(cfg, "plan.base") else keys


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

    With ``plan.enabled`` (``plan=true``) it trains nothing: it prints the memory plan and returns it
    (:func:`trainer.cli.plan_run.run_plan`).

    Returns:
        The final logged metrics (floats), ``optimized_metric`` (the value of
        ``cfg.optimized_metric``), ``checkpoint`` (the newest checkpoint path) and ``global_step``.
    """
    if planning(cfg):  # for the device the run will have: this machine's precision support is beside the point
        from trainer.cli.plan_run import run_plan

        return run_plan(cfg)
    check_precision(cfg.trainer)  # refused at config time: before the heavy imports
    from trainer.callbacks.provenance import Provenance
    from trainer.cli.fit_run import fit_from_config
    from trainer.cli.hydra_app import resolved_container

    run = fit_from_config(cfg, "model", [Provenance(resolved_container(cfg))], param_groups=True)
    metrics = run.metrics
    metrics["optimized_metric"] = metrics.get(cfg.get("optimized_metric") or "", float("nan"))
    return metrics


@lf_command("train", setup=train_setup, may_stay_missing=data_not_needed)
def main(cfg: DictConfig) -> float | None:
    """Console entry point; in a sweep, returns the optimized metric for Hydra's sweepers.

    A sweep's trial (a multirun job, or a run of a W&B sweep agent) records itself in ``trial.json``
    in its output folder, and a diverged, out-of-memory or pruned trial returns NaN instead of
    stopping a multirun. A plain run just trains. A preempted run exits with status 75
    (``@lf_command``: :mod:`trainer.cli.preempted`).
    """
    if not planning(cfg):
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
