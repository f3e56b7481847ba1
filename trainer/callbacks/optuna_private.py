"""Optuna names that latentforge uses although Optuna's docs reserve them for Optuna itself, and why.

A sweep's trial is asked for by the sweeper process and reported to by the training job (another
process, or the same process through another ``Study`` object). Optuna's public API reaches a trial
by its number only to ``Study.tell`` it, so :func:`trial_handle` builds a ``Trial`` for "trial N of
study S" with ``optuna.trial.Trial(study, trial_id)`` (its docs: "direct use of this constructor is
not recommended"), taking the trial's id from the storage's ``get_study_id_from_name`` and
``get_trial_id_from_study_id_trial_number`` (``BaseStorage`` "is not supposed to be directly accessed
by library users"). On that ``Trial`` only public methods are called: ``report`` and ``should_prune``
(the pruning callback :mod:`trainer.callbacks.optuna_pruning`), ``set_user_attr`` (the sweeper marks a
dead sweeper's trial ``interrupted``, :mod:`trainer.sweeps.study`; the adapter sits here, below both users).

All are public names with documented signatures; ``CONTRACTS`` checks them against the installed Optuna.
"""

from __future__ import annotations

import optuna
from optuna.storages import BaseStorage

from lf_common.upstream_contract import PrivateName

ADAPTER = "trainer/callbacks/optuna_private.py"


def trial_id(storage: BaseStorage, study_name: str, number: int) -> int:
    """The storage id of the trial ``number`` of the study ``study_name``."""
    return storage.get_trial_id_from_study_id_trial_number(storage.get_study_id_from_name(study_name), number)


def trial_handle(study: optuna.Study, storage: BaseStorage, number: int) -> optuna.Trial:
    """A ``Trial`` for the trial ``number`` of ``study``, which was loaded or created from ``storage``."""
    return optuna.trial.Trial(study, trial_id(storage, study.study_name, number))


CONTRACTS = (
    PrivateName("optuna", "optuna.trial.Trial", "__init__", ADAPTER, parameters=("self", "study", "trial_id")),
    *(
        PrivateName("optuna", "optuna.storages.BaseStorage", name, ADAPTER, parameters=("self", *parameters))
        for name, parameters in (
            ("get_study_id_from_name", ("study_name",)),
            ("get_trial_id_from_study_id_trial_number", ("study_id", "trial_number")),
        )
    ),
)
