"""Pickles a user may be handed: one that would run code, and an original Stable Diffusion ``.ckpt``
(tensors plus the trainer state of the ``pytorch_lightning`` that wrote it, which is not installed)."""

from __future__ import annotations

import sys
import types
from pathlib import Path
from typing import Any

import torch

LIGHTNING_CHECKPOINT_CALLBACK = "pytorch_lightning.callbacks.model_checkpoint"


class CodePayload:
    """Unpickling this would create the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def save_original_sd_ckpt(state_dict: dict[str, torch.Tensor], path: Path) -> None:
    """``torch.save`` ``state_dict`` as the original SD checkpoints are: ``{"state_dict", "global_step",
    "callbacks": {ModelCheckpoint: {...}}}``, the class named as ``pytorch_lightning``'s."""
    saved = {name: sys.modules.get(name) for name in _module_names()}
    module = types.ModuleType(LIGHTNING_CHECKPOINT_CALLBACK)
    module.ModelCheckpoint = type("ModelCheckpoint", (), {"__module__": LIGHTNING_CHECKPOINT_CALLBACK})
    sys.modules.update({name: types.ModuleType(name) for name in _module_names()[:-1]})
    sys.modules[LIGHTNING_CHECKPOINT_CALLBACK] = module
    try:
        state: dict[str, Any] = {"monitor": None, "best_model_path": "logs/last.ckpt"}
        torch.save(
            {"state_dict": state_dict, "global_step": 470000, "callbacks": {module.ModelCheckpoint: state}}, path
        )
    finally:
        for name, previous in saved.items():
            if previous is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = previous


def _module_names() -> list[str]:
    parts = LIGHTNING_CHECKPOINT_CALLBACK.split(".")
    return [".".join(parts[: i + 1]) for i in range(len(parts))]
