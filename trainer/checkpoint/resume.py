"""Which checkpoints are complete, and which one a resume takes.

Checkpoints are written under a temporary name and renamed when complete
(:class:`trainer.callbacks.checkpoint.AtomicModelCheckpoint`), so a crash leaves no half-written
checkpoint under a final name. A file can still be damaged afterwards (a full disk, a copy cut
short), so a resume checks what it takes: a checkpoint file is a zip archive (``torch.save``'s
format) whose central directory is intact and whose members lie inside the file; a DeepSpeed
checkpoint folder has its ``latest`` tag, the model-state file of rank 0, and only such files.

``resolve_resume_checkpoint`` turns ``ckpt_path`` into the checkpoint to resume from: ``last``
means the newest complete checkpoint of the run's checkpoint folder; a damaged checkpoint is
passed over for the previous complete one, and the log says which one and why.
``auto_resume_checkpoint`` is ``auto_resume=true``'s choice: ``last`` when the folder holds
checkpoints, nothing for a fresh run, so a requeued or restarted job needs no edited command line.
"""

from __future__ import annotations

import logging
import re
import zipfile
from collections.abc import Callable
from pathlib import Path, PurePosixPath

from lf_common.errors import DataError
from trainer.interop.pickle_contents import describe_refused, file_globals, foreign_globals

log = logging.getLogger(__name__)

PARTIAL_SUFFIX = ".partial"
LAST_NAME = "last"
_STEP = re.compile(r"step[-=](\d+)")


def checkpoint_problem(path: str | Path) -> str | None:
    """Why ``path`` is not a complete checkpoint, or ``None`` when it is.

    Args:
        path: a checkpoint file (``torch.save`` zip) or a DeepSpeed checkpoint folder.
    """
    path = Path(path)
    if path.name.endswith(PARTIAL_SUFFIX):
        return "a partial write (its save did not finish)"
    if path.is_dir():
        return _deepspeed_folder_problem(path)
    if not path.is_file():
        return "does not exist"
    return _zip_problem(path) or _foreign_problem(path)


def _foreign_problem(path: Path) -> str | None:
    """What a checkpoint names besides tensors (Lightning's ``torch.load(weights_only=True)`` would refuse it)."""
    names = file_globals(path)
    foreign = foreign_globals(names) if names is not None else []
    return describe_refused(path) if names is None or foreign else None


def _zip_problem(path: Path) -> str | None:
    size = path.stat().st_size
    try:
        with zipfile.ZipFile(path) as archive:
            members = archive.infolist()
    except (zipfile.BadZipFile, OSError) as error:
        return f"not a complete torch.save archive ({size} bytes; {error})"
    if not any(m.filename.endswith("data.pkl") for m in members):
        return "no data.pkl member: not a torch.save archive"
    end = max(m.header_offset + len(m.filename) + 30 + m.compress_size for m in members)
    if end > size:
        return f"truncated: its members end at byte {end}, the file at {size}"
    return None


def _deepspeed_folder_problem(path: Path) -> str | None:
    latest = path / "latest"
    if not latest.is_file():
        return "no 'latest' file: not a complete DeepSpeed checkpoint folder"
    tag = path / latest.read_text().strip()
    states = sorted(tag.glob("*model_states.pt"))
    if not states:
        return f"{tag.name}/ holds no model-state file"
    for part in sorted(tag.glob("*.pt")):
        if problem := _zip_problem(part):
            return f"{part.relative_to(path)}: {problem}"
    return None


def checkpoint_step(path: str | Path) -> int | None:
    """The global step in a checkpoint's name (``step-0000500.ckpt``), or ``None``."""
    match = _STEP.search(PurePosixPath(str(path)).name)
    return int(match.group(1)) if match else None


def newest_first(written: dict[str, float]) -> list[str]:
    """Checkpoint names (or URLs) newest first, from when each was written: ``last*``, then by step.

    ``last.ckpt`` is rewritten right after each step's checkpoint, so it is normally the newest.
    A run that dies after ``step-N.ckpt`` was written but before ``last.ckpt`` was rewritten (a
    large checkpoint takes a while) leaves ``last.ckpt`` one save behind: step checkpoints written
    after it come before it. Names that are neither ``last*`` nor carry a step are left out.

    Args:
        written: each checkpoint's name or URL -> when it was written (any clock, compared only).
    """
    last = sorted(name for name in written if PurePosixPath(name).name.startswith(LAST_NAME))
    stepped = sorted((name for name in written if checkpoint_step(name) is not None), key=checkpoint_step, reverse=True)
    last_written = max((written[name] for name in last), default=None)
    after_last = [name for name in stepped if last_written is not None and written[name] > last_written]
    return after_last + last + [name for name in stepped if name not in after_last]


def checkpoints_newest_first(folder: str | Path) -> list[Path]:
    """The checkpoints of a local folder, newest first (:func:`newest_first`, by modification time)."""
    folder = Path(folder)
    entries = [p for p in folder.iterdir() if p.suffix == ".ckpt" and not p.name.endswith(PARTIAL_SUFFIX)]
    return [folder / name for name in newest_first({p.name: p.stat().st_mtime_ns for p in entries})]


def auto_resume_checkpoint(checkpoint_dir: str | Path | None) -> str | None:
    """What ``auto_resume`` resumes from: ``"last"`` when ``checkpoint_dir`` holds checkpoints (complete or
    damaged: :func:`resolve_resume_checkpoint` picks or explains), ``None`` for a fresh run."""
    if checkpoint_dir is None or not Path(checkpoint_dir).is_dir():
        return None
    return LAST_NAME if checkpoints_newest_first(checkpoint_dir) else None


def _is_checkpoint_folder(path: Path) -> bool:
    """A folder of checkpoints (not itself a DeepSpeed checkpoint)."""
    return path.is_dir() and not (path / "latest").exists() and any(path.glob("*.ckpt"))


def resolve_resume_checkpoint(ckpt_path: str | None, checkpoint_dir: str | Path | None) -> str | None:
    """The complete checkpoint to resume from.

    Args:
        ckpt_path: ``None`` (no resume), ``"last"`` (the newest complete checkpoint in
            ``checkpoint_dir``), a folder of checkpoints (its newest complete one), or a checkpoint
            (itself when complete, else, when damaged, the newest complete one before it in its folder).
        checkpoint_dir: the run's checkpoint folder (for ``"last"``).

    Raises:
        DataError: no complete checkpoint is found; the message lists what was checked and why
            each was refused.
    """
    if ckpt_path is None or ckpt_path == "":
        return None
    if ckpt_path == LAST_NAME:
        if checkpoint_dir is None or not Path(checkpoint_dir).is_dir():
            raise DataError(
                f"ckpt_path=last: the checkpoint folder {checkpoint_dir} does not exist; set output_dir to the "
                "run to resume, or give ckpt_path=<checkpoint or folder>"
            )
        candidates, wanted = checkpoints_newest_first(checkpoint_dir), None
    elif _is_checkpoint_folder(Path(ckpt_path)):
        candidates, wanted = checkpoints_newest_first(ckpt_path), None
    else:
        wanted = Path(ckpt_path)
        if checkpoint_problem(wanted) is None:
            return str(wanted)
        if not wanted.exists():
            raise DataError(
                f"ckpt_path={wanted}: checkpoint does not exist; give a checkpoint file or folder, or ckpt_path=last "
                "(the newest complete one in output_dir)"
            )
        listed = [str(p) for p in checkpoints_newest_first(wanted.parent)]
        candidates = [wanted, *older_than(str(wanted), listed)]
    where = checkpoint_dir if ckpt_path == LAST_NAME else ckpt_path
    return first_complete([str(p) for p in candidates], checkpoint_problem, ckpt_path, where)


def older_than(wanted: str, newest: list[str]) -> list[str]:
    """The checkpoints of ``newest`` (newest first) that a damaged ``wanted`` falls back to: those with a
    smaller step (every other one for ``last.ckpt``, which has none)."""
    step = checkpoint_step(wanted)
    return [
        p
        for p in newest
        if p != wanted and (step is None or (checkpoint_step(p) is not None and checkpoint_step(p) < step))
    ]


def first_complete(
    candidates: list[str], problem: Callable[[str], str | None], ckpt_path: str, where: str | Path | None
) -> str:
    """The first of ``candidates`` (newest first) without a ``problem``; the passed-over ones are logged.

    Args:
        candidates: checkpoint paths or URLs, newest first.
        problem: why a candidate is not a complete checkpoint, or ``None`` (:func:`checkpoint_problem`).
        ckpt_path: what the user asked for (named in the error).
        where: the folder or checkpoint searched (named in the error).

    Raises:
        DataError: none is complete; lists each candidate and why it was refused.
    """
    refused: list[str] = []
    for path in candidates:
        reason = problem(path)
        if reason is None:
            if refused:
                log.warning("resume: passed over %s; resuming from %s", "; ".join(refused), path)
            else:
                log.info("resume: from %s", path)
            return path
        refused.append(f"{PurePosixPath(path).name} ({reason})")
    raise DataError(
        f"ckpt_path={ckpt_path}: no complete checkpoint to resume from at {where}: "
        f"{'; '.join(refused) or 'none found'}; "
        "give ckpt_path=<a checkpoint lf-train wrote>, or leave ckpt_path unset to start afresh"
    )
