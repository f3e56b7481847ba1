"""hydra-optuna-sweeper's private names that latentforge uses, and why no public API does the job.

The plugin's public class, ``hydra_plugins.hydra_optuna_sweeper.optuna_sweeper.OptunaSweeper``,
only delegates to ``OptunaSweeperImpl`` in its private module ``_impl``, which holds the whole
sweep: reading ``hydra.sweeper.params`` and ``search_space`` into Optuna distributions
(``_process_searchspace_config``, ``_parse_sweeper_params_config``, ``create_params_from_overrides``),
the grid of a ``GridSampler`` (``_to_grid_sampler_choices``), the study's directions
(``_get_directions``) and each trial's overrides (``_configure_trials``, which also runs a
``custom_search_space`` function). The resumable sweeper (``trainer.sweeps.optuna_sweeper``)
keeps all of that and replaces the loop, so it subclasses ``OptunaSweeperImpl`` through
:class:`OptunaSweeperSteps`, which gives those steps names of ours. The attributes the loop reads
(``sampler``, ``n_trials``, ``storage``, ...) are set by ``OptunaSweeperImpl.__init__`` and
``setup``; ``CONTRACTS`` checks them too.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import optuna
from hydra_plugins.hydra_optuna_sweeper._impl import OptunaSweeperImpl, create_params_from_overrides
from optuna.distributions import BaseDistribution

from lf_common.upstream.contract import PrivateName

ADAPTER = "lf_common/upstream/hydra_optuna_private.py"
UPSTREAM = "hydra-optuna-sweeper"


class OptunaSweeperSteps(OptunaSweeperImpl):
    """``OptunaSweeperImpl`` (takes its arguments) with the private steps of its sweep under names of ours."""

    def parameter_space(self, arguments: Sequence[str]) -> tuple[dict[str, BaseDistribution], dict[str, Any]]:
        """The swept parameters' distributions and the fixed parameters' values.

        From ``hydra.sweeper.params`` (or the deprecated ``search_space``) and the command line's
        ``arguments``, as the plugin reads them; a parameter given a fixed value is not swept.
        """
        self._process_searchspace_config()
        distributions, fixed_params = create_params_from_overrides(
            self._parse_sweeper_params_config() + list(arguments)
        )
        if self.search_space_distributions:
            distributions = {**self.search_space_distributions, **distributions}
        for name in fixed_params:
            distributions.pop(name, None)
        return distributions, fixed_params

    def grid_choices(self, distribution: BaseDistribution) -> Any:
        """The values a ``GridSampler`` tries for ``distribution`` (a discrete one)."""
        return self._to_grid_sampler_choices(distribution)

    def directions(self) -> list[str]:
        """The study's optimization directions, e.g. ``["minimize"]``."""
        return self._get_directions()

    def trial_overrides(
        self, trials: Sequence[optuna.Trial], distributions: dict[str, BaseDistribution], fixed_params: dict[str, Any]
    ) -> Sequence[Sequence[str]]:
        """Sample each trial's parameters and return its command-line overrides, ``("lr=0.001", ...)``."""
        return self._configure_trials(list(trials), distributions, fixed_params)


_IMPL = "hydra_plugins.hydra_optuna_sweeper._impl"
_METHODS = {  # name: parameters after self
    "__init__": "sampler direction storage study_name n_trials n_jobs max_failure_rate search_space "
    "custom_search_space params",
    "_process_searchspace_config": "",
    "_parse_sweeper_params_config": "",
    "_to_grid_sampler_choices": "distribution",
    "_get_directions": "",
    "_configure_trials": "trials search_space_distributions fixed_params",
}
_ATTRIBUTES = "sampler storage study_name n_trials n_jobs max_failure_rate job_idx search_space_distributions"
_SET_IN_SETUP = ("self.config = config", "self.launcher =")


def _bare_impl() -> OptunaSweeperImpl:
    return OptunaSweeperImpl(None, "minimize", None, None, 1, 1, 0.0, None, None, None)


CONTRACTS = (
    PrivateName(UPSTREAM, _IMPL, "create_params_from_overrides", ADAPTER, parameters=("arguments",)),
    *(
        PrivateName(UPSTREAM, f"{_IMPL}.OptunaSweeperImpl", name, ADAPTER, parameters=("self", *parameters.split()))
        for name, parameters in _METHODS.items()
    ),
    *(
        PrivateName(UPSTREAM, f"{_IMPL}.OptunaSweeperImpl", name, ADAPTER, kind="attribute", instance=_bare_impl)
        for name in _ATTRIBUTES.split()
    ),
    *(
        PrivateName(UPSTREAM, f"{_IMPL}.OptunaSweeperImpl.setup", text, ADAPTER, kind="source")
        for text in _SET_IN_SETUP
    ),
)
