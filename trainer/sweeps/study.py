"""An Optuna study in its storage: opening it, its shared trial budget, and trials a dead sweeper left running.

The sweeper writes ``[host, pid]`` of its process into every trial it asks for (user attribute
``latentforge_owner``). A trial still ``RUNNING`` whose sweeper process on this host is gone was
interrupted (the sweep was killed): it is marked ``latentforge_interrupted`` and failed, and it does
not count toward ``n_trials``, so a restarted sweep asks for it again. Running trials of live workers
(other processes sharing the storage, ``launch/sweep_gpus.sh``) count, so parallel workers share one
budget.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from pathlib import Path
from typing import Any

import optuna
from filelock import FileLock
from optuna.storages import BaseStorage
from optuna.trial import FrozenTrial, TrialState

from lf_common.errors import ConfigError
from trainer.callbacks.optuna_private import trial_handle

log = logging.getLogger(__name__)

OWNER, INTERRUPTED = "latentforge_owner", "latentforge_interrupted"
# Studies of latentforge before Optuna 4 kept these as system attributes, the owner once as two of them.
_OWNER_HOST, _OWNER_PID = "latentforge_host", "latentforge_pid"
SQLITE = "sqlite:///"


def owner_record() -> list[str | int]:
    """``[host, pid]`` of this sweeper process, written to a trial in ONE storage write (a kill between
    two writes left a trial with a host and no pid, taken for alive forever)."""
    return [socket.gethostname(), os.getpid()]


def _attr(trial: FrozenTrial, key: str) -> Any:
    """A latentforge attribute of ``trial``: a user attribute, or a system attribute in an older study."""
    return trial.user_attrs.get(key, trial.system_attrs.get(key))


def _owner_alive(trial: FrozenTrial, unowned_is_dead: bool = False) -> bool:
    """Whether the sweeper process that asked for ``trial`` still runs (unknown hosts: assume so).

    A trial with no owner record at all was asked by a sweeper killed between ``study.ask`` and the
    owner's write; with ``unowned_is_dead`` (the caller holds the study lock under which every sweeper
    asks and records its owner) it counts as dead, else as alive (another sweeper may be between the two).
    """
    host, pid = _attr(trial, OWNER) or (trial.system_attrs.get(_OWNER_HOST), trial.system_attrs.get(_OWNER_PID))
    if host is None and pid is None:
        return not unowned_is_dead
    if host != socket.gethostname() or pid is None:
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def tell(study: optuna.Study, trial: optuna.Trial | int, **result: Any) -> None:
    """``study.tell(trial, **result)``. A ``GridSampler`` that has tried its whole grid calls ``Study.stop``,
    which raises outside ``Study.optimize`` (after the result was stored): that error is ignored."""
    try:
        study.tell(trial, **result)
    except RuntimeError:
        if not isinstance(study.sampler, optuna.samplers.GridSampler):
            raise


def fail_interrupted_trials(study: optuna.Study, storage: BaseStorage, locked: bool = False) -> int:
    """Mark RUNNING trials whose sweeper process died as FAIL (``interrupted``); returns how many.

    Args:
        study: the study.
        storage: the storage it was created with (:func:`open_storage`).
        locked: whether the caller holds :func:`study_lock` (a real lock: SQLite storage), so a trial with
            no owner record was left by a sweeper killed between asking for it and recording itself.
    """
    count = 0
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if not _owner_alive(trial, unowned_is_dead=locked):
            handle = trial_handle(study, storage, trial.number)
            handle.set_user_attr(INTERRUPTED, True)
            tell(study, handle, state=TrialState.FAIL)
            log.warning("trial %d was interrupted (its sweeper process is gone): marked failed", trial.number)
            count += 1
    return count


def counted_trials(study: optuna.Study) -> int:
    """Trials that count toward ``n_trials``: finished ones (not interrupted) and live running ones."""
    count = 0
    for trial in study.get_trials(deepcopy=False):
        if trial.state == TrialState.FAIL and _attr(trial, INTERRUPTED):
            continue
        if trial.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL, TrialState.RUNNING):
            count += 1
    return count


def make_sqlite_folder(storage: Any) -> None:
    """Create the folder of a ``sqlite:///PATH`` storage (SQLite does not, and the sweep folder
    does not exist yet when the study is created)."""
    if isinstance(storage, str) and storage.startswith(SQLITE):
        Path(storage.removeprefix(SQLITE)).parent.mkdir(parents=True, exist_ok=True)


def open_storage(storage: str | BaseStorage | None) -> BaseStorage:
    """The storage ``hydra.sweeper.storage`` names: a database URL (``sqlite:///PATH``, ``postgresql://...``;
    an SQLite file's folder is created), a storage object (e.g. an ``optuna.storages.JournalStorage`` built by
    Hydra), or ``None``: in memory (nothing resumes, and the pruning callback cannot reach it).

    Raises:
        ConfigError: the database holds the tables of an older Optuna (a study of latentforge before Optuna 4);
            the message gives the command that upgrades them.
    """
    if storage is None:
        return optuna.storages.InMemoryStorage()
    if isinstance(storage, BaseStorage):
        return storage
    make_sqlite_folder(storage)
    try:
        return optuna.storages.RDBStorage(storage)
    except RuntimeError as error:  # Optuna's refusal of an older table schema, naming the upgrade command
        raise ConfigError(
            f"hydra.sweeper.storage={storage}: {error} (here: optuna storage upgrade --storage {storage})"
        ) from error


def has_study_lock(storage: Any) -> bool:
    """Whether :func:`study_lock` is a real lock for ``storage`` (a ``sqlite:///PATH`` URL)."""
    return isinstance(storage, str) and storage.startswith(SQLITE)


def study_lock(storage: Any) -> contextlib.AbstractContextManager[Any]:
    """A lock that parallel sweepers on one ``sqlite:///PATH`` storage take while they create the
    study (two creating a new database's tables at once: ``UNIQUE constraint failed:
    alembic_version``) and while they count it and ask for trials (without it two can both see room
    for one more trial and both ask); other storages get none (their workers may overshoot
    ``n_trials`` by up to ``n_jobs`` each)."""
    if has_study_lock(storage):
        make_sqlite_folder(storage)
        return FileLock(storage.removeprefix(SQLITE) + ".lock")
    return contextlib.nullcontext()
