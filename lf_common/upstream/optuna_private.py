"""Optuna's private names that latentforge uses, and why no public API does the job.

A study's storage (``Study._storage``) and its id in it (``Study._study_id``) are how a trial
that this process did not ask for is reached by its number: the pruning callback of a training
job reports to the trial its sweeper asked for (``optuna.Trial(study, trial_id)``, whose
constructor the docs reserve for Optuna itself), and the resumable sweeper marks the trials of a
dead sweeper process as failed. Optuna 2's public API reaches a trial by its number only to
``Study.tell`` it, which also runs the sampler's ``after_trial``; here the state is set in the
storage, as before.
"""

from __future__ import annotations

from typing import Any

import optuna
from optuna.trial import TrialState

from lf_common.upstream.contract import PrivateName

ADAPTER = "lf_common/upstream/optuna_private.py"


def trial_id(study: optuna.Study, number: int) -> int:
    """The storage id of the trial ``number`` of ``study``."""
    return study._storage.get_trial_id_from_study_id_trial_number(study._study_id, number)


def trial_handle(study: optuna.Study, number: int) -> optuna.Trial:
    """A ``Trial`` for the trial ``number`` of ``study`` (to ``report`` to and ask ``should_prune``)."""
    return optuna.Trial(study, trial_id(study, number))


def fail_trial(study: optuna.Study, number: int, system_attrs: dict[str, Any]) -> None:
    """Set ``system_attrs`` on the trial ``number`` of ``study`` and mark it failed, in the storage only."""
    storage, trial = study._storage, trial_id(study, number)
    for key, value in system_attrs.items():
        storage.set_trial_system_attr(trial, key, value)
    storage.set_trial_state(trial, TrialState.FAIL)


def _study() -> optuna.Study:
    return optuna.create_study()


CONTRACTS = (
    PrivateName("optuna", "optuna.study.Study", "_storage", ADAPTER, kind="attribute", instance=_study),
    PrivateName("optuna", "optuna.study.Study", "_study_id", ADAPTER, kind="attribute", instance=_study),
    PrivateName("optuna", "optuna.trial.Trial", "__init__", ADAPTER, parameters=("self", "study", "trial_id")),
    *(
        PrivateName("optuna", "optuna.storages.BaseStorage", name, ADAPTER, parameters=("self", *parameters))
        for name, parameters in (
            ("get_trial_id_from_study_id_trial_number", ("study_id", "trial_number")),
            ("set_trial_system_attr", ("trial_id", "key", "value")),
            ("set_trial_state", ("trial_id", "state")),  # public in Optuna 2; Optuna 3 has set_trial_state_values
        )
    ),
)
