"""Where the Hydra configs live, and the small helpers every entry point shares.

Importing this module registers nothing and imports no torch-ecosystem framework (``lf-* --help`` and
config errors answer without them): :func:`register_resolvers` registers the OmegaConf resolvers when a
command's ``main`` (or :func:`compose_config`) runs, and Lightning is imported by the helpers that build
a ``Trainer``, when the job runs.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from trainer.strategies import gpu_defaults

if TYPE_CHECKING:
    import lightning as L

CONF_MODULE = "latentforge_conf"
"""The configs ship in the package: ``conf/`` of the source tree installs as this module (pyproject.toml)."""
CONF_DIR = f"pkg://{CONF_MODULE}"
"""What ``@hydra.main(config_path=...)`` takes; users add their own folders with ``hydra.searchpath``."""


def conf_folder() -> Path:
    """The built-in configs as a folder on disk (the installed package, or ``conf/`` of an editable install)."""
    return Path(str(resources.files(CONF_MODULE)))


VERSION_BASE = "1.3"


def sweep_group() -> str | None:
    """``${lf_sweep_group:}``: one name for all jobs of a Hydra multirun (``<task>-<sweep folder>``,
    e.g. a W&B group), ``None`` in a single run."""
    if not HydraConfig.initialized():
        return None
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode != RunMode.MULTIRUN:
        return None
    return f"{hydra_cfg.job.name}-{Path(hydra_cfg.sweep.dir).name}"


def register_resolvers() -> None:
    """Register the configs' OmegaConf resolvers: ``${lf_sweep_group:}`` and the GPU defaults
    (``${lf_on_cuda:...}``, ``${lf_default_precision:...}``, ...; :mod:`trainer.strategies.gpu_defaults`).

    Called by every command's ``main`` before Hydra composes, and by :func:`compose_config`; registering
    again replaces the same functions (no effect).
    """
    OmegaConf.register_new_resolver("lf_sweep_group", sweep_group, replace=True)
    gpu_defaults.register_resolvers()


def resolved_container(cfg: DictConfig) -> dict[str, Any]:
    """The config with interpolations resolved, as plain dicts and lists."""
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


def instantiate_group(group: DictConfig | None) -> list[Any]:
    """Instantiate every entry of a group of named objects (callbacks, loggers); ``None`` gives []."""
    if not group:
        return []
    return [instantiate(node) for node in group.values() if node is not None and "_target_" in node]


def build_trainer(cfg: DictConfig, extra_callbacks: list[Any] | None = None) -> L.Trainer:
    """The configured ``Trainer`` with ``cfg.callbacks`` (+ extras) and ``cfg.logger``; the loggers
    get the resolved config as the run's hyperparameters.

    ``trainer.enable_progress_bar=false`` turns off the progress bar of ``cfg.callbacks`` too
    (Lightning refuses a progress-bar callback with that flag), so the flag stays the one switch;
    ``trainer.enable_checkpointing=false`` likewise drops the checkpoint callbacks (the periodic
    checkpoints and preemption's, which writes one).
    """
    from lightning.pytorch.callbacks import Checkpoint, ProgressBar

    from trainer.cli.quiet import quiet_known_noise

    quiet_known_noise()  # before the Trainer logs its litlogger tip
    callbacks = instantiate_group(cfg.get("callbacks")) + list(extra_callbacks or [])
    if not cfg.trainer.get("enable_progress_bar", True):
        callbacks = [c for c in callbacks if not isinstance(c, ProgressBar)]
    if not cfg.trainer.get("enable_checkpointing", True):
        callbacks = [c for c in callbacks if not isinstance(c, Checkpoint)]
    loggers = instantiate_group(cfg.get("logger"))
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    for logger in loggers:
        logger.log_hyperparams(resolved_container(cfg))
    return trainer


@contextmanager
def finishing_loggers(trainer: L.Trainer) -> Iterator[None]:
    """Close the trainer's W&B run when the block ends (marked failed on an exception), so the next
    job of a multirun, in the same process, starts its own run instead of appending to this one."""
    from lightning.pytorch.loggers import WandbLogger

    from trainer.cli.lightning_private import wandb_run_started

    failed = False
    try:
        yield
    except BaseException:
        failed = True
        raise
    finally:
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger) and wandb_run_started(logger):
                logger.experiment.finish(exit_code=1 if failed else 0)


def optimizer_factories(cfg: DictConfig, param_groups: bool = False) -> dict[str, Any]:
    """``optimizer`` and ``lr_scheduler`` partials for a LightningModule (the scheduler may be ``None``), and with
    ``param_groups`` the per-part settings of ``cfg.optim`` (``unet_lr``, ...), which are not the optimizer's
    arguments (:func:`trainer.modules.param_groups.split_optim_config`)."""
    from trainer.modules.param_groups import split_optim_config

    optimizer, settings = split_optim_config(cfg.optim)
    factories = {
        "optimizer": instantiate(optimizer),
        "lr_scheduler": instantiate(cfg.lr_scheduler) if cfg.get("lr_scheduler") else None,
    }
    return {**factories, "param_groups": settings} if param_groups else factories


def compose_config(config_name: str, overrides: list[str]) -> DictConfig:
    """Compose ``conf/<config_name>.yaml`` with overrides, as its command line would.

    Works inside a running Hydra app (which has already initialised Hydra) and outside one; registers
    the resolvers (:func:`register_resolvers`) the config's values use.
    """
    register_resolvers()
    if GlobalHydra.instance().is_initialized():
        return compose(config_name=config_name, overrides=list(overrides))
    with initialize_config_module(CONF_MODULE, version_base=VERSION_BASE):
        return compose(config_name=config_name, overrides=list(overrides))
