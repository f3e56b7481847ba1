"""The search space of an Optuna sweep, read with Hydra's own override grammar.

``hydra.sweeper.params`` and the sweep's command line give each key a fixed value
(``optim.weight_decay=0.0``) or a sweep, parsed by Hydra's ``OverridesParser`` and mapped to Optuna
distributions as hydra-optuna-sweeper mapped them:

============================================  =====================================================
override                                      Optuna distribution
============================================  =====================================================
``choice(16, 32)``, ``16,32``                 ``CategoricalDistribution([16, 32])``
``range(1, 9, step=2)`` (ints)                ``IntDistribution(1, 9, step=2)`` (both ends included)
``range(0.0, 1.0, step=0.25)``                ``FloatDistribution(0.0, 1.0, step=0.25)``
``shuffle(range(...))``                       ``CategoricalDistribution`` of the range's values
``interval(0, 0.1)``                          ``FloatDistribution(0, 0.1)`` (``IntDistribution`` when
                                              both ends are ints, e.g. ``int(interval(4, 16))``)
``tag(log, interval(1e-5, 1e-2))``            the same with ``log=True``
============================================  =====================================================

The last mention of a key wins (the command line after ``params``), so a fixed value on the command line
takes a key out of the search. Every fixed override is passed to every trial as written.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, Override, RangeSweep, Transformer
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution

from lf_common.errors import ConfigError

SUPPORTED = "choice(...), a,b,c, range(...), interval(...) or tag(log, interval(...))"


@dataclass
class SearchSpace:
    """What a sweep samples and what it passes to every trial unchanged.

    Attributes:
        distributions: the swept keys (as Hydra writes them, ``+``/``++`` prefixes kept) and their distributions.
        fixed: the other overrides, ``{key: the override as written}`` (``"optim.weight_decay=0.0"``).
    """

    distributions: dict[str, BaseDistribution] = field(default_factory=dict)
    fixed: dict[str, str] = field(default_factory=dict)

    def fixed_values(self) -> dict[str, str]:
        """``{key: value}`` of the fixed overrides (the part after ``=``)."""
        return {key: line.partition("=")[2] for key, line in self.fixed.items()}

    def overrides(self, params: Mapping[str, Any]) -> list[str]:
        """One trial's command-line overrides: its sampled ``params``, then the fixed overrides."""
        return [*(f"{key}={value}" for key, value in params.items()), *self.fixed.values()]


def parse_search_space(params: Mapping[str, Any] | None, arguments: Sequence[str]) -> SearchSpace:
    """The search space of ``hydra.sweeper.params`` and the sweep's command-line ``arguments``.

    Args:
        params: ``{key: override value}``, e.g. ``{"optim.lr": "tag(log, interval(1e-5, 1e-2))"}``.
        arguments: the command line's overrides (``hydra.overrides.task``), e.g. ``["optim.weight_decay=0.0"]``.

    Raises:
        ConfigError: a sweep the Optuna sweeper cannot sample (``glob(...)``, a choice of lists or dicts).
    """
    lines = [f"{key}={value}" for key, value in (params or {}).items()] + list(arguments)
    space = SearchSpace()
    for override in OverridesParser.create().parse_overrides(lines):
        key = override.get_key_element()
        space.distributions.pop(key, None)
        space.fixed.pop(key, None)
        if override.is_sweep_override():
            space.distributions[key] = distribution(override)
        else:
            space.fixed[key] = override.input_line or f"{key}={override.get_value_element_as_str()}"
    return space


def distribution(override: Override) -> BaseDistribution:
    """The Optuna distribution of one sweep override (see the module docstring for the mapping)."""
    value = override.value()
    if isinstance(value, ChoiceSweep) or (isinstance(value, RangeSweep) and value.shuffle):
        return CategoricalDistribution(_choices(override, shuffled=value.shuffle))
    if isinstance(value, RangeSweep):
        assert value.start is not None and value.stop is not None  # the grammar requires both
        if any(isinstance(x, float) for x in (value.start, value.stop, value.step)):
            return FloatDistribution(float(value.start), float(value.stop), step=float(value.step))
        return IntDistribution(int(value.start), int(value.stop), step=int(value.step))
    if isinstance(value, IntervalSweep):
        assert value.start is not None and value.end is not None
        log = "log" in value.tags
        if isinstance(value.start, int) and isinstance(value.end, int):
            return IntDistribution(value.start, value.end, log=log)
        return FloatDistribution(float(value.start), float(value.end), log=log)
    raise ConfigError(f"{override.input_line}: the Optuna sweeper samples {SUPPORTED}")


def _choices(override: Override, shuffled: bool) -> list[str | int | float | bool]:
    """The values of a choice (or shuffled range) sweep: strings, numbers and booleans as parsed; ``null``, lists
    and dicts as the text of their override (``"null"``, ``"[1,2]"``), which a trial's override parses back.

    A shuffled sweep's values are sorted: the order means nothing to a sampler, and a resumed study needs the
    same choices in the same order.
    """
    choices = list(override.sweep_iterator(transformer=Transformer.encode))
    return sorted(choices, key=lambda choice: (type(choice).__name__, choice)) if shuffled else choices


def grid_choices(distributions: Mapping[str, BaseDistribution]) -> dict[str, list[Any]]:
    """The values a ``GridSampler`` tries for each key: every value its distribution can give.

    Raises:
        ConfigError: a continuous distribution (``interval(...)``, or a ``range`` sampled on a log scale).
    """
    grid: dict[str, list[Any]] = {}
    for key, dist in distributions.items():
        if isinstance(dist, CategoricalDistribution):
            grid[key] = list(dist.choices)
        elif isinstance(dist, IntDistribution) and not dist.log:
            grid[key] = list(range(dist.low, dist.high + 1, dist.step))
        elif isinstance(dist, FloatDistribution) and dist.step is not None:
            count = round((dist.high - dist.low) / dist.step) + 1
            grid[key] = [dist.low + i * dist.step for i in range(count)]
        else:
            raise ConfigError(
                f"{key}: the grid sampler (hydra/sweeper/sampler=grid) needs a finite set of values, "
                "choice(...) or range(...), not an interval"
            )
    return grid


def check_resumable(study_name: str, recorded: Mapping[str, BaseDistribution], space: SearchSpace) -> None:
    """Refuse a search space that Optuna cannot add to a study's trials (a resumed study keeps each parameter's
    kind, log scale and categorical choices; its ranges may change).

    Args:
        study_name: the study, for the message.
        recorded: the distributions the study's trials were sampled from, ``{key: distribution}``.
        space: this sweep's search space.

    Raises:
        ConfigError: a key whose distribution differs in one of those ways, naming both.
    """
    for key, new in space.distributions.items():
        old = recorded.get(key)
        if old is None:
            continue
        categorical = isinstance(old, CategoricalDistribution)
        if (
            type(old) is not type(new)
            or getattr(old, "log", False) != getattr(new, "log", False)
            or (categorical and old != new)
        ):
            raise ConfigError(
                f"hydra.sweeper.study_name={study_name}: the study's trials sampled {key} from {old}, this sweep "
                f"from {new}; sweep it as before, or start a new study (another study_name or storage)"
            )
