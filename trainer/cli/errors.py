"""The one error path of the ``lf-*`` commands: what an expected mistake looks like to the user.

An expected mistake (a missing or wrong path, a bad config value, a corrupt or foreign file, a
refused pickle, bad data, a config the command refuses, a key that does not exist or is not set)
becomes one or two plain lines: what is wrong and where, then the fix. :func:`explain` returns them,
or ``None`` for anything else, which keeps its traceback (:mod:`trainer.cli.command` decides).

Expected mistakes are the project's :class:`~lf_common.errors.DataError` (with ``KeyMapError``,
``StaleLatentsError``, ``TooManyCorruptSamples``, ``CorruptSampleError``),
:class:`~lf_common.errors.ConfigError`, the faults whose messages name the place and the fix
(:class:`~lf_common.errors.StorageError`: a checkpoint write that failed, e.g. a full disk;
``LoaderWorkerDied``: a data-loader worker killed, e.g. by the OOM killer), OmegaConf's
missing-value and interpolation errors, Hydra's composition and override-parsing errors, and
Hydra's ``InstantiationException`` when it wraps one of those (unwrapped) or a constructor
refusing a keyword (a config key the class does not take).
"""

from __future__ import annotations

import difflib
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from hydra.errors import (
    CompactHydraException,
    ConfigCompositionException,
    InstantiationException,
    MissingConfigException,
    OverrideParseException,
)
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import InterpolationResolutionError, MissingMandatoryValue

from lf_common.errors import ConfigError, DataError, StorageError
from trainer.cli.command_doc import CommandDoc

PROJECT_ERRORS = (DataError, ConfigError, StorageError)
"""The project's own errors for bad input and for faults of the machine; their messages say what,
where and the fix (with ``LoaderWorkerDied``: :func:`user_errors`)."""
_LOADER_MODULE = "data_pipelines.shards.resumable_loader"


def user_errors() -> tuple[type[BaseException], ...]:
    """:data:`PROJECT_ERRORS` and ``LoaderWorkerDied`` once its module is loaded (it imports torch; an error of
    that class exists only after the job imported it, so a config error imports no torch here)."""
    loader = sys.modules.get(_LOADER_MODULE)
    return (*PROJECT_ERRORS, loader.LoaderWorkerDied) if loader is not None else PROJECT_ERRORS


_NOT_OVERRIDABLE = re.compile(r"Could not override '([^']+)'")
_APPEND_EXISTING = re.compile(r"Could not append to config\. An item is already at '([^']+)'")
_BAD_KEYWORD = re.compile(r"Error in call to target '([^']+)':\n\w+\(\"?'?.*?(unexpected keyword argument '(\w+)')")
_FULL_KEY = re.compile(r"full_key: (\S+)")
_TORCH_REFUSAL = re.compile(r"WeightsUnpickler error: (.+?)(?:\n\n|$)", re.S)


@dataclass(frozen=True)
class PlainError:
    """An expected mistake, as the user reads it.

    Attributes:
        what: what is wrong and where (file, key, shard, sample), one line.
        fix: what to do (the option to set, the command to run), or ``None`` when ``what`` says it.
    """

    what: str
    fix: str | None = None

    def lines(self, command: str) -> list[str]:
        """The one or two lines printed for ``command``."""
        return [f"{command}: error: {self.what}"] + ([f"  fix: {self.fix}"] if self.fix else [])


@dataclass(frozen=True)
class ErrorContext:
    """What the error path knows about the command that failed.

    Attributes:
        doc: the command's docstring (its name and examples).
        overrides: the command line's ``key=value`` overrides.
        compose: composes the command's config with overrides (for the keys near a wrong one).
    """

    doc: CommandDoc
    overrides: list[str]
    compose: Callable[[list[str]], DictConfig]


def explain(error: BaseException, context: ErrorContext) -> PlainError | None:
    """The plain lines for an expected mistake; ``None`` for an unexpected error (keeps its traceback)."""
    error = _unwrapped(error)
    if isinstance(error, user_errors()):
        return PlainError(_one_line(str(error)))
    if isinstance(error, MissingMandatoryValue):
        return missing_value(error.full_key, context.doc)
    if isinstance(error, InterpolationResolutionError):
        return PlainError(f"{error.full_key}: {_one_line(error.msg)}", "check the ${...} in that value")
    if isinstance(error, MissingConfigException):
        return missing_option(error, context.doc)
    if isinstance(error, OverrideParseException):
        return PlainError(
            f"cannot read the override {error.override!r}: {_one_line(error.message.split('See https')[0])}",
            "quote a value holding spaces, brackets or commas, e.g. 'prompts=[\"a red cat\"]'",
        )
    if isinstance(error, ConfigCompositionException):
        return composition_error(error, context)
    if isinstance(error, InstantiationException):
        return bad_keyword(str(error))
    if "Weights only load failed" in str(error):  # torch's refusal from a load outside this project's code
        reason = _TORCH_REFUSAL.search(str(error))
        return PlainError(
            f"a file was refused by torch.load(weights_only=True): {_one_line(reason.group(1)) if reason else ''}",
            "give a checkpoint lf-train wrote; a Stable Diffusion checkpoint you trust: "
            "lf-import pretrained=FILE allow_pickle=true converts it",
        )
    if isinstance(error, CompactHydraException):
        return PlainError(_one_line(str(error)))
    return None


def _unwrapped(error: BaseException) -> BaseException:
    """The error an ``InstantiationException`` wraps, when it is an expected one (else the wrapper)."""
    seen = error
    while isinstance(seen, InstantiationException) and seen.__cause__ is not None:
        seen = seen.__cause__
    expected = (*user_errors(), MissingMandatoryValue, InterpolationResolutionError, CompactHydraException)
    return seen if isinstance(seen, expected) else error


def _one_line(text: str) -> str:
    """``text`` with its lines joined (messages of Hydra and OmegaConf span several)."""
    return "; ".join(line.strip() for line in str(text).strip().splitlines() if line.strip())


def missing_value(key: str, doc: CommandDoc) -> PlainError:
    """A mandatory value (``???``) that was not given: name the key and show a command line that sets it."""
    what = doc.key_help(key)
    example = doc.example_with(key) or f"{doc.command} {key}=VALUE"
    return PlainError(
        f"{key} is not set{f': {what}' if what else ''}",
        f"set it on the command line, e.g. {example.split('  #')[0].strip()}",
    )


def missing_option(error: MissingConfigException, doc: CommandDoc) -> PlainError:
    """A config group option that does not exist (``model=tinyy``): the nearest options."""
    missing = error.missing_cfg_file or ""
    group, _, option = missing.rpartition("/")
    options = sorted(error.options or [])
    if not group or not options:
        return PlainError(_one_line(str(error)))
    near = difflib.get_close_matches(option, options, n=2, cutoff=0.5)
    guess = f"did you mean {' or '.join(f'{group}={n}' for n in near)}? " if near else ""
    return PlainError(f"{group}={option}: no such option", f"{guess}{group} takes one of: {', '.join(options)}")


def composition_error(error: ConfigCompositionException, context: ErrorContext) -> PlainError:
    """A key that is not in the config (a typo, most often): the nearest existing keys, not Hydra's
    advice to append it with ``+`` (which would add the typo as a new key)."""
    text = str(error)
    if match := _APPEND_EXISTING.search(text):
        key = match.group(1)
        return PlainError(f"+{key}: the config already has {key}", f"drop the +: {key}=VALUE")
    match = _NOT_OVERRIDABLE.search(text)
    if match is None:
        cause = f": {_one_line(str(error.__cause__))}" if error.__cause__ else ""
        return PlainError(_one_line(text) + cause)
    key = match.group(1).lstrip("+~")
    value = _override_value(context.overrides, key)
    config = _compose_without(context, key)
    near = nearest_keys(config, key) if config is not None else []
    if near:
        shown = " or ".join(f"{n}={value}" if value is not None else n for n in near)
        return PlainError(f"unknown key {key}", f"did you mean {shown}? ({context.doc.command} --help: the main keys)")
    parent = key.rpartition(".")[0]
    siblings = _keys_at(config, parent) if config is not None else []
    listed = f"; {parent or 'the config'} has {', '.join(siblings[:12])}{', ...' if len(siblings) > 12 else ''}"
    return PlainError(
        f"unknown key {key}{listed if siblings else ''}",
        f"check the spelling ({context.doc.command} --cfg job prints every key); "
        f"to add a key the config does not have: +{key}={value if value is not None else 'VALUE'}",
    )


def _override_value(overrides: list[str], key: str) -> str | None:
    """The value ``key`` is given on the command line (``None`` when it is not there)."""
    for override in overrides:
        name, sep, value = override.partition("=")
        if sep and name.lstrip("+~") == key:
            return value
    return None


def _compose_without(context: ErrorContext, key: str) -> DictConfig | None:
    """The command's config with the overrides but the one of ``key`` (or with none, when those fail)."""
    others = [o for o in context.overrides if o.partition("=")[0].lstrip("+~") != key]
    for overrides in (others, []):
        try:
            return context.compose(overrides)
        except Exception:  # another bad override: try without any
            continue
    return None


def nearest_keys(config: DictConfig, key: str, limit: int = 3) -> list[str]:
    """Existing dotted keys close to ``key``: its siblings of a similar name, else keys anywhere whose
    last part is close to its last part (``max_step`` -> ``trainer.max_steps``)."""
    parts = key.split(".")
    node: Any = config
    for depth, part in enumerate(parts):
        if not isinstance(node, DictConfig):
            break
        if part in node:
            plain = not OmegaConf.is_interpolation(node, part) and not OmegaConf.is_missing(node, part)
            node = node[part] if plain else None
            continue
        near = difflib.get_close_matches(part, [str(k) for k in node], n=limit, cutoff=0.6)
        if near:
            prefix, rest = ".".join(parts[:depth]), ".".join(parts[depth + 1 :])
            return [".".join(p for p in (prefix, n, rest) if p) for n in near]
        break
    by_leaf: dict[str, list[str]] = {}
    for full in _leaf_keys(config):
        by_leaf.setdefault(full.rpartition(".")[2], []).append(full)
    near_leaves = difflib.get_close_matches(parts[-1], list(by_leaf), n=limit, cutoff=0.75)
    return [full for name in near_leaves for full in by_leaf[name]][:limit]


def _keys_at(config: DictConfig, dotted: str) -> list[str]:
    """The keys of the node at ``dotted`` (the root for ``""``); [] when there is none."""
    node = config if not dotted else OmegaConf.select(config, dotted, default=None, throw_on_resolution_failure=False)
    return sorted(str(k) for k in node) if isinstance(node, DictConfig) else []


def _leaf_keys(config: DictConfig) -> list[str]:
    """Every dotted key of ``config`` (values not resolved)."""
    container = OmegaConf.to_container(config, resolve=False)
    keys: list[str] = []

    def walk(value: Any, prefix: str) -> None:
        if isinstance(value, dict):
            for name, child in value.items():
                walk(child, f"{prefix}.{name}" if prefix else str(name))
        elif prefix:
            keys.append(prefix)

    walk(container, "")
    return keys


def bad_keyword(message: str) -> PlainError | None:
    """A constructor that refused a config key (``+data.foo=1``); ``None`` for other instantiation errors."""
    match = _BAD_KEYWORD.search(message)
    if match is None:
        return None
    target, argument = match.group(1), match.group(3)
    full_key = _FULL_KEY.search(message)
    where = f"{full_key.group(1)}.{argument}" if full_key else argument
    return PlainError(
        f"{where}: {target.rpartition('.')[2]} takes no argument {argument!r}",
        f"remove {where} from the command line or config (--cfg job shows the keys it takes)",
    )
