"""Read weight files without running code: safetensors, or pickles only when asked, ``weights_only``."""

from __future__ import annotations

import pickle
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from lf_common.errors import DataError
from trainer.interop.pickle_contents import INERT_GLOBALS, code_globals, describe_refused, file_globals

SAFETENSORS_SUFFIX = ".safetensors"
PICKLE_SUFFIXES = frozenset([".ckpt", ".pt", ".pth", ".bin"])
NESTING_KEY = "state_dict"
TEXTUAL_INVERSION_PICKLE_KEY = "string_to_param"  # AUTOMATIC1111's .pt embeddings: {"*": (N, D)}
CHECKPOINT_EXPECTED = "give a checkpoint lf-train wrote (<output_dir>/checkpoints/last.ckpt)"
IMPORT_FIX = "a Stable Diffusion checkpoint you trust? convert it: lf-import pretrained={path} allow_pickle=true"
"""The fix for a pickle of tensors that is not a training checkpoint (lf-import reads its tensors, never its code)."""
CODE_FIX = (
    "no Stable Diffusion or lf-train checkpoint names code; if you trust its source anyway, "
    "get the model as .safetensors and lf-import that"
)
"""The fix for a pickle that names code: nothing here loads it (lf-import included)."""
_LOAD_ERRORS = (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, AttributeError, ValueError)


class InertState:
    """What an :data:`~trainer.interop.pickle_contents.INERT_GLOBALS` object becomes when
    ``lf-import`` reads an original Stable Diffusion ``.ckpt``: its pickled attributes, no behaviour."""


def load_torch_file(path: str | Path, expected: str = CHECKPOINT_EXPECTED, inert_state: bool = False) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU, with a refusal that says what the file is.

    torch's own message for a refused file advises loading it with ``weights_only=False`` (which
    runs the code a pickle names); this one says what the file holds instead, and the fix.

    Args:
        path: a ``torch.save`` archive or a pickle.
        expected: what to give instead of a file that is no pickle at all.
        inert_state: rebuild the training state an original Stable Diffusion ``.ckpt`` carries
            (``INERT_GLOBALS``) as :class:`InertState` objects instead of refusing the file.

    Raises:
        DataError: torch refused or could not read the file.
    """
    stand_ins = [(InertState, name) for name in INERT_GLOBALS] if inert_state else []
    try:
        with warnings.catch_warnings(), torch.serialization.safe_globals(stand_ins):
            warnings.filterwarnings("ignore", message="Detected pickle protocol")  # said by the error, if it fails
            return torch.load(path, map_location="cpu", weights_only=True)
    except _LOAD_ERRORS:
        names = file_globals(path)
        fix = expected if names is None else CODE_FIX if code_globals(names) else IMPORT_FIX.format(path=path)
        raise DataError(f"{path}: refused: {describe_refused(path)}; {fix}") from None


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
    rebuilds only tensors and plain containers (and the original SD checkpoints' trainer state as
    inert objects) and never calls what the pickle names. A pickle's
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
    loaded = load_torch_file(path, expected="give the model's .safetensors (or .ckpt) file", inert_state=True)
    nesting = None
    if isinstance(loaded, dict) and isinstance(loaded.get(NESTING_KEY), dict):
        loaded, nesting = loaded[NESTING_KEY], NESTING_KEY
    if not isinstance(loaded, dict):
        raise DataError(f"{path}: expected a dict of tensors, found {type(loaded).__name__}")
    state = {key: value for key, value in loaded.items() if isinstance(value, torch.Tensor)}
    if isinstance(embedding := loaded.get(TEXTUAL_INVERSION_PICKLE_KEY), dict):  # AUTOMATIC1111's .pt: named, refused
        state |= {f"{TEXTUAL_INVERSION_PICKLE_KEY}.{k}": v for k, v in embedding.items() if isinstance(v, torch.Tensor)}
    return WeightFile(state, {}, nesting)


def refuse_non_floating(state: dict[str, torch.Tensor], source: str) -> None:
    """Refuse weights that are not floating point (a file written with a wrong save dtype), naming them.

    Raises:
        DataError: one line: the file, the first keys and their dtypes, and the fix.
    """
    odd = sorted((key, str(tensor.dtype).removeprefix("torch.")) for key, tensor in state.items()
                 if not tensor.is_floating_point())  # fmt: skip
    if odd:
        more = f" and {len(odd) - 3} more" if len(odd) > 3 else ""
        named = ", ".join(f"{key} ({dtype})" for key, dtype in odd[:3]) + more
        raise DataError(
            f"{source}: {len(odd)} weights are not floating point: {named}; model weights are float16, bfloat16 or "
            "float32: re-save the file with a floating save dtype (e.g. kohya's --save_precision fp16)"
        )
