"""Where the Hydra configs live, and the small helpers every entry point shares."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

CONF_DIR = str(Path(__file__).resolve().parents[2] / "conf")
VERSION_BASE = "1.3"


def resolved_container(cfg: DictConfig) -> dict[str, Any]:
    """The config with interpolations resolved, as plain dicts and lists."""
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


def instantiate_group(group: DictConfig | None) -> list[Any]:
    """Instantiate every entry of a group of named objects (callbacks, loggers); ``None`` gives []."""
    if not group:
        return []
    return [instantiate(node) for node in group.values() if node is not None and "_target_" in node]


def compose_config(config_name: str, overrides: list[str]) -> DictConfig:
    """Compose ``conf/<config_name>.yaml`` with overrides, as its command line would.

    Works inside a running Hydra app (which has already initialised Hydra) and outside one.
    """
    if GlobalHydra.instance().is_initialized():
        return compose(config_name=config_name, overrides=list(overrides))
    with initialize_config_dir(CONF_DIR, version_base=VERSION_BASE):
        return compose(config_name=config_name, overrides=list(overrides))
