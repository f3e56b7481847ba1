"""What a pickle or ``torch.save`` file names, read without unpickling it.

``torch.load(weights_only=True)`` refuses a file that names anything besides tensors and plain
containers, and its message advises turning ``weights_only`` off, which would run whatever the file
names. The errors of this project say instead what the file is: this module walks the pickle's
opcodes with :mod:`pickletools` (nothing is imported or called) and lists the globals it names.
"""

from __future__ import annotations

import io
import pickletools
import zipfile
from pathlib import Path

TENSOR_GLOBALS = frozenset(
    [
        "collections.OrderedDict",
        "builtins.set",
        "builtins.frozenset",
        "builtins.bytearray",
        "builtins.slice",
        "builtins.complex",
        "_codecs.encode",
    ]
)
"""Globals besides ``torch.*`` that a file of tensors and plain containers names."""
INERT_GLOBALS = frozenset(
    [
        "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint",
        "lightning.pytorch.callbacks.model_checkpoint.ModelCheckpoint",
    ]
)
"""Training state that the original Stable Diffusion ``.ckpt`` files carry beside their tensors (the
trainer's checkpoint callback). ``lf-import allow_pickle=true`` rebuilds these as inert stand-ins
(:func:`trainer.interop.safe_load.load_torch_file`): none of their code is imported or run."""
_STRING_OPS = frozenset(["SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "SHORT_BINSTRING", "BINSTRING"])
_GET_OPS = frozenset(["BINGET", "LONG_BINGET", "GET"])
_PUT_OPS = frozenset(["BINPUT", "LONG_BINPUT", "PUT"])
_MAX_SCAN_BYTES = 64 << 20
_PROTO = b"\x80"  # the first byte of a pickle of protocol 2 or later (torch.save's legacy format too)


def pickle_globals(data: bytes) -> list[str]:
    """The globals (``module.name``) a pickle names, in first-seen order.

    Raises:
        ValueError: ``data`` does not start with a pickle.
    """
    names: list[str] = []
    memo: dict[int, object] = {}
    pushed: list[object] = []
    for opcode, argument, _ in pickletools.genops(io.BytesIO(data)):
        name = opcode.name
        if name in _STRING_OPS:
            pushed.append(argument)
        elif name in _GET_OPS:
            pushed.append(memo.get(int(argument)))
        elif name in _PUT_OPS:
            memo[int(argument)] = pushed[-1] if pushed else None
        elif name == "MEMOIZE":
            memo[len(memo)] = pushed[-1] if pushed else None
        elif name == "STOP":
            break
        else:
            if name == "STACK_GLOBAL" and len(pushed) >= 2:
                names.append(f"{pushed[-2]}.{pushed[-1]}")
            elif name in ("GLOBAL", "INST"):
                names.append(str(argument).replace(" ", "."))
            pushed.append(None)  # what other opcodes leave on the stack does not name a global
    return list(dict.fromkeys(names))


def file_globals(path: str | Path) -> list[str] | None:
    """The globals a ``torch.save`` archive's ``data.pkl`` or a plain pickle file names; ``None`` when
    the file is neither (damaged, cut short, or another kind of file)."""
    path = Path(path)
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                member = next((n for n in archive.namelist() if n.endswith("data.pkl")), None)
                if member is None:
                    return None
                return pickle_globals(archive.read(member))
        with path.open("rb") as handle:
            data = handle.read(_MAX_SCAN_BYTES)
        return pickle_globals(data) if data[:1] == _PROTO else None
    except (ValueError, OSError, zipfile.BadZipFile, EOFError):
        return None


def foreign_globals(names: list[str]) -> list[str]:
    """The globals of ``names`` that are neither torch's nor plain containers: what
    ``torch.load(weights_only=True)`` refuses, and what would run if the file were unpickled."""
    return [n for n in names if not n.startswith("torch.") and n not in TENSOR_GLOBALS]


def code_globals(names: list[str]) -> list[str]:
    """The globals of ``names`` that would run code if the file were unpickled (neither tensors,
    plain containers nor :data:`INERT_GLOBALS`)."""
    return [n for n in foreign_globals(names) if n not in INERT_GLOBALS]


def describe_refused(path: str | Path) -> str:
    """Why ``torch.load(weights_only=True)`` refuses ``path``, in a few words a user can act on."""
    names = file_globals(path)
    if names is None:
        return (
            "not a PyTorch checkpoint (neither a torch.save archive nor a pickle: another kind of file, or cut short)"
        )
    code = code_globals(names)
    if code:
        shown = ", ".join(code[:4]) + (f" and {len(code) - 4} more" if len(code) > 4 else "")
        return f"a pickle that names {shown} besides tensors (code that would run if it were unpickled)"
    inert = [n for n in foreign_globals(names) if n in INERT_GLOBALS]
    if inert:
        return f"a pickle of tensors and another trainer's state ({', '.join(inert)}), not a checkpoint lf-train wrote"
    return "a pickle torch.load(weights_only=True) cannot read as tensors"
