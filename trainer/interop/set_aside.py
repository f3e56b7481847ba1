"""Weights a single file holds that the diffusers parts have no place for, kept beside an imported folder.

SD 2.x files hold OpenCLIP's whole text tower; SD 2.x uses its penultimate layer, so diffusers'
``CLIPTextModel`` has 23 layers and no ``text_projection`` or ``logit_scale``. ``lf-import`` sets the
last block, ``text_projection`` and ``logit_scale`` aside (:attr:`trainer.interop.layouts.Normalized.set_aside`)
in :data:`SET_ASIDE_FILE` beside the folder (original single-file keys); the export copies the file into
its folder, and a single-file export writes them back, so a file survives import -> export with the same
keys (ComfyUI otherwise warns "clip missing" and holds an uninitialised layer).
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

SET_ASIDE_FILE = "single_file_extras.safetensors"
SET_ASIDE_LAYOUT = "sd2"
"""The single-file text layout whose extras are kept (SD 2.x's OpenCLIP tower)."""


def write_set_aside(
    folder: str | Path, tensors: dict[str, torch.Tensor], dtype: torch.dtype | None = None
) -> Path | None:
    """Write ``tensors`` (original keys) as ``folder/single_file_extras.safetensors``; nothing when there are none.

    Args:
        dtype: cast floating tensors to it (the import's dtype); ``None`` keeps theirs.
    """
    if not tensors:
        return None
    path = Path(folder) / SET_ASIDE_FILE
    cast = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v) for k, v in tensors.items()}
    cast = {k: v.contiguous() for k, v in cast.items()}
    save_file(cast, str(path), metadata={"format": "pt"})
    return path


def set_aside_file(folder: str | Path) -> Path | None:
    """``folder/single_file_extras.safetensors`` when a pipeline folder has one, else ``None``."""
    path = Path(folder) / SET_ASIDE_FILE
    return path if path.is_file() else None


def read_set_aside(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a set-aside file, by their original single-file keys."""
    return load_file(str(path))
