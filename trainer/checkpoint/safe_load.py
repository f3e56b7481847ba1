"""Read weight files without running code: safetensors, or pickles only when asked, ``weights_only``."""

from __future__ import annotations

import pickle
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from lf_common.errors import DataError

SAFETENSORS_SUFFIX = ".safetensors"
PICKLE_SUFFIXES = frozenset([".ckpt", ".pt", ".pth", ".bin"])
NESTING_KEY = "state_dict"


@dataclass
class WeightFile:
    """What a weight file holds.

    Attributes:
        state: its tensors, by key.
        metadata: the safetensors header's strings (empty for pickles).
        nesting: the entry a pickle's tensors were taken from (``"state_dict"`` for ldm's ``.ckpt``), or ``None``.
    """

    state: dict[str, torch.Tensor]
    metadata: dict[str, str] = field(default_factory=dict)
    nesting: str | None = None


def read_weights(path: str | Path, allow_pickle: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors of a weight file and its metadata (see :func:`read_weight_file`)."""
    weights = read_weight_file(path, allow_pickle)
    return weights.state, weights.metadata


def read_weight_file(path: str | Path, allow_pickle: bool = False) -> WeightFile:
    """The tensors of a weight file, its metadata (safetensors' header; empty for pickles) and nesting.

    A ``.safetensors`` file is read as such. A pickle (``.ckpt``, ``.pt``, ``.pth``, ``.bin``) is
    refused unless ``allow_pickle``, and then read with ``torch.load(weights_only=True)``, which
    rebuilds only tensors and plain containers and never calls what the pickle names. A pickle's
    ``{"state_dict": ...}`` wrapper (ldm's checkpoints) is unwrapped; values that are not tensors
    are dropped.

    Raises:
        DataError: the file is missing, is a pickle and ``allow_pickle`` is false, holds objects
            that ``weights_only`` refuses, or has an unknown suffix.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: weight file does not exist")
    suffix = path.suffix.lower()
    if suffix == SAFETENSORS_SUFFIX:
        with safe_open(str(path), framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
        return WeightFile(load_file(str(path)), metadata)
    if suffix not in PICKLE_SUFFIXES:
        raise DataError(f"{path}: unknown weight file type {suffix!r}; expected .safetensors (or a .ckpt/.pt pickle)")
    if not allow_pickle:
        raise DataError(
            f"{path}: a pickle ({suffix}) is refused because unpickling can run code; convert it to "
            ".safetensors, or pass allow_pickle=true to read it with torch.load(weights_only=True)"
        )
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, AttributeError) as error:
        raise DataError(
            f"{path}: refused by torch.load(weights_only=True) (it holds more than weights): {error}"
        ) from None
    nesting = None
    if isinstance(loaded, dict) and isinstance(loaded.get(NESTING_KEY), dict):
        loaded, nesting = loaded[NESTING_KEY], NESTING_KEY
    if not isinstance(loaded, dict):
        raise DataError(f"{path}: expected a dict of tensors, found {type(loaded).__name__}")
    return WeightFile({key: value for key, value in loaded.items() if isinstance(value, torch.Tensor)}, {}, nesting)
