"""Which checkpoints are complete, and which one a resume takes: one rule for a local folder and a bucket.

Checkpoints are written under a temporary name and renamed when complete
(:class:`trainer.callbacks.checkpoint.AtomicModelCheckpoint`; in a bucket, uploaded with a DeepSpeed folder's
``latest`` tag last: :mod:`trainer.checkpoint.remote`), so a crash leaves no half-written checkpoint under
a final name. A file can still be damaged afterwards (a full disk, a copy cut short), so a resume checks
what it takes: a checkpoint file is a zip archive (``torch.save``'s format) whose central directory is
intact and whose members lie inside the file; a DeepSpeed checkpoint folder has its ``latest`` tag, the
model-state file of rank 0, and only such files.

:func:`resume_checkpoint` is the one resolution ``lf-train`` and ``lf-train-autoencoder`` use: ``ckpt_path``
when given, else with ``auto_resume`` ``last`` when the checkpoint folder holds checkpoints (nothing for a
fresh run, so a requeued job needs no edited command line). :func:`choose_checkpoint` turns it into the
checkpoint to resume from: ``last`` means the newest complete checkpoint of the run's checkpoint folder
(``last`` against step checkpoints by when each was written); a damaged checkpoint is passed over for the
previous complete one, and the log says which one and why. The folder and the checkpoint are local paths or
URLs alike (:mod:`lf_common.object_store` lists both); a checkpoint in a bucket is checked and resumed from
its local copy (:func:`lf_common.object_cache.local_path`, under ``<output_dir>/checkpoint-cache``).
"""

from __future__ import annotations

import logging
import re
import shutil
import zipfile
from collections.abc import Callable
from pathlib import Path, PurePosixPath

from lf_common import object_store
from lf_common.errors import DataError
from lf_common.object_cache import local_path
from trainer.interop.pickle_contents import describe_refused, file_globals, foreign_globals

log = logging.getLogger(__name__)

PARTIAL_SUFFIX = ".partial"
LAST_NAME = "last"
TAG_FILE = "latest"
"""The file of a DeepSpeed checkpoint folder that names its tag; written (and uploaded) last."""
CHECKPOINT_CACHE = "checkpoint-cache"
"""The folder under ``output_dir`` that a checkpoint in a bucket is downloaded to before a resume."""
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
    latest = path / TAG_FILE
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


def _listed_checkpoints(folder: str | Path) -> dict[str, float | None]:
    """The checkpoints in a local folder or under a prefix: path or URL -> when written (a DeepSpeed folder's: its
    ``latest`` tag's, ``None`` without one: a save or an upload cut short). ``.partial`` writes are left out."""
    written: dict[str, float | None] = {}
    for entry in object_store.list_entries(folder):
        path = entry["url"]
        if not path.endswith(".ckpt"):
            continue
        if entry.get("type") == "directory":
            inside = object_store.list_entries(path)
            tag = next((e for e in inside if object_store.basename(e["url"]) == TAG_FILE), None)
            written[path] = tag["modified"] if tag else None
        else:
            written[path] = entry["modified"]
    return written


def checkpoint_paths_newest_first(folder: str | Path) -> list[str]:
    """The checkpoints (paths or URLs) of a local folder or a prefix, newest first (:func:`newest_first`); a
    DeepSpeed folder without its ``latest`` tag comes last among equals (incomplete: tried, and explained)."""
    listed = _listed_checkpoints(folder)
    return newest_first({path: 0.0 if written is None else written for path, written in listed.items()})


def checkpoints_newest_first(folder: str | Path) -> list[Path]:
    """The checkpoints of a local folder, newest first (:func:`checkpoint_paths_newest_first`)."""
    return [Path(path) for path in checkpoint_paths_newest_first(folder)]


def has_checkpoints(folder: str | Path | None) -> bool:
    """Whether the local folder or prefix ``folder`` holds checkpoints (complete or damaged: the resolution picks or
    explains). A ``.partial`` write or a DeepSpeed folder without its ``latest`` tag (a save or an upload cut short)
    does not count: a run whose first save was cut short starts afresh under ``auto_resume``."""
    if folder is None:
        return False
    listed = _listed_checkpoints(folder)
    return bool(newest_first({path: written for path, written in listed.items() if written is not None}))


def auto_resume_checkpoint(checkpoint_dir: str | Path | None) -> str | None:
    """What ``auto_resume`` resumes from: ``"last"`` when ``checkpoint_dir`` holds checkpoints
    (:func:`has_checkpoints`), ``None`` for a fresh run."""
    return LAST_NAME if has_checkpoints(checkpoint_dir) else None


def _is_checkpoint_folder(path: str) -> bool:
    """A folder or prefix holding checkpoints (not itself a DeepSpeed checkpoint folder, nor a checkpoint file: a
    listing of an object's key gives the object itself)."""
    entries = object_store.list_entries(path)
    names = {object_store.basename(e["url"]) for e in entries if e["url"] != path.rstrip("/")}
    return TAG_FILE not in names and any(name.endswith(".ckpt") for name in names)


def resume_checkpoint(
    ckpt_path: str | None, checkpoint_dir: str | None, auto_resume: bool, cache_dir: str | Path
) -> tuple[str | None, str | None]:
    """The checkpoint a run resumes from: ``ckpt_path`` when given; else, with ``auto_resume``, the newest complete
    checkpoint of ``checkpoint_dir``, or none when that holds no checkpoint (a fresh run).

    Args:
        ckpt_path: the run's ``ckpt_path`` (see :func:`choose_checkpoint`).
        checkpoint_dir: the run's checkpoint folder or prefix (``callbacks.model_checkpoint.dirpath``).
        auto_resume: resume from ``checkpoint_dir`` when it holds checkpoints.
        cache_dir: where a checkpoint in a bucket is downloaded (``<output_dir>/checkpoint-cache``).

    Returns:
        The local checkpoint to give Lightning (``None``: start afresh), and the URL it was downloaded from
        (``None`` when it is no copy).

    Raises:
        DataError: no complete checkpoint is found (each one tried and why it was refused).
        ObjectStoreError: the store cannot be reached.
    """
    wanted = ckpt_path or None
    if wanted is None and auto_resume:
        wanted = auto_resume_checkpoint(checkpoint_dir)
        if wanted is None:
            log.info("auto_resume: no checkpoint in %s; starting at step 0", checkpoint_dir)
    if wanted is None:
        return None, None
    chosen, copy = choose_checkpoint(wanted, checkpoint_dir, cache_dir)
    return copy, (chosen if copy != chosen else None)


def resolve_resume_checkpoint(
    ckpt_path: str | None, checkpoint_dir: str | Path | None, cache_dir: str | Path | None = None
) -> str | None:
    """The local path of the complete checkpoint to resume from (:func:`choose_checkpoint`'s copy), or ``None``
    when ``ckpt_path`` is unset."""
    if not ckpt_path:
        return None
    return choose_checkpoint(ckpt_path, checkpoint_dir, cache_dir)[1]


def choose_checkpoint(
    ckpt_path: str, checkpoint_dir: str | Path | None, cache_dir: str | Path | None = None
) -> tuple[str, str]:
    """The complete checkpoint to resume from, and its local path (itself, or its copy from a bucket).

    Args:
        ckpt_path: ``"last"`` (the newest complete checkpoint in ``checkpoint_dir``), a folder or prefix of
            checkpoints (its newest complete one), or a checkpoint (itself when complete, else, when damaged,
            the newest complete one before it in its folder); a local path or a URL.
        checkpoint_dir: the run's checkpoint folder or prefix (for ``"last"``).
        cache_dir: where a checkpoint in a bucket is downloaded (other copies there are removed: one checkpoint
            on disk); ``None``: :func:`lf_common.object_cache.default_cache_dir`.

    Raises:
        DataError: no complete checkpoint is found; the message lists what was checked and why each was refused.
        ObjectStoreError: the store cannot be reached.
    """
    if ckpt_path == LAST_NAME:
        if checkpoint_dir is None or not object_store.exists(checkpoint_dir):
            raise DataError(
                f"ckpt_path=last: the checkpoint folder {checkpoint_dir} does not exist; set output_dir (or "
                "callbacks.model_checkpoint.dirpath) to the run to resume, or give ckpt_path=<checkpoint or folder>"
            )
        candidates, where = checkpoint_paths_newest_first(checkpoint_dir), str(checkpoint_dir)
    elif _is_checkpoint_folder(ckpt_path):
        candidates, where = checkpoint_paths_newest_first(ckpt_path), ckpt_path
    else:
        ckpt_path = ckpt_path.rstrip("/") or ckpt_path  # a folder named with its slash is listed without it
        if not object_store.exists(ckpt_path):
            raise DataError(
                f"ckpt_path={ckpt_path}: checkpoint does not exist; give a checkpoint or a folder of them, or "
                "ckpt_path=last (the newest complete one in callbacks.model_checkpoint.dirpath, under output_dir)"
            )
        newest = checkpoint_paths_newest_first(object_store.parent(ckpt_path))
        candidates, where = [ckpt_path, *older_than(ckpt_path, newest)], ckpt_path
    copies: dict[str, str] = {}  # path -> local path: the path itself when local (local_path returns it unchanged)

    def problem(path: str) -> str | None:
        try:
            copies[path] = local_path(path, cache_dir)
        except object_store.ObjectStoreError as error:
            return f"cannot be downloaded: {error}"
        reason = checkpoint_problem(copies[path])
        if reason is not None and copies[path] != path:
            shutil.rmtree(Path(copies[path]).parent, ignore_errors=True)  # no damaged copy kept on disk
        return reason

    chosen = first_complete(candidates, problem, ckpt_path, where)
    if copies[chosen] != chosen and cache_dir is not None:
        _keep_only(Path(cache_dir), Path(copies[chosen]))
    return chosen, copies[chosen]


def _keep_only(cache_dir: Path, copy: Path) -> None:
    """Remove every cached checkpoint but ``copy`` (local disk holds one downloaded checkpoint)."""
    keep = copy.parent.parent  # <cache_dir>/<url key>/<version>/<name>
    for entry in cache_dir.iterdir():
        if entry != keep and entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)


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
