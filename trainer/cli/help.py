"""``lf-<command> --help``: what the command does, examples, its main keys and the config groups it uses.

The text comes from the command's docstring (:class:`~trainer.cli.command_doc.CommandDoc`) and the
config composed with the command line's overrides: the keys' current values, and each config group
the command uses with its choice and the other options. ``@lf_command`` answers ``--help`` itself
instead of Hydra: Hydra's help lists every group of ``conf/`` (also those the command does not use)
and, filling its template, walks every group and option of ``conf/`` and of Hydra's own (about 170
composes, seconds per ``--help``) whether the template shows them or not.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager

from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from hydra.core.object_type import ObjectType
from omegaconf import DictConfig, ListConfig, OmegaConf

from trainer.cli.command_doc import CommandDoc
from trainer.cli.hydra_app import CONF_MODULE, VERSION_BASE

HELP_FLAGS = frozenset(["--help", "-h"])
MAX_EXAMPLES = 4
_INDENT = "  "


def help_text(doc: CommandDoc, root: DictConfig) -> str:
    """The help of the command ``doc`` describes, with values from ``root`` (the composed config with ``hydra``)."""
    lines = [f"{doc.command}: {doc.description}", ""]
    if doc.examples:
        lines += ["Examples:", *(_INDENT + example for example in doc.examples[:MAX_EXAMPLES]), ""]
    if doc.keys:
        lines.append("Main keys (set any key with KEY=VALUE; ??? must be given):")
        shown = [(f"{key}={_value(root, key)}", what) for key, what in doc.keys]
        width = min(max(len(text) for text, _ in shown), 40)
        lines += [f"{_INDENT}{text:<{width}}  {what}" for text, what in shown]
        lines.append("")
    groups = _groups(root)
    if groups:
        lines.append("Config groups (GROUP=OPTION; the current one first):")
        width = max(len(group) for group, _, _ in groups)
        for group, choice, options in groups:
            others = [o for o in options if o != choice]
            also = f"  (also: {', '.join(others)})" if others else ""
            lines.append(f"{_INDENT}{group + ':':<{width + 1}} {choice if choice is not None else 'none'}{also}")
        lines.append("")
    lines += [
        f"Every key and its value: {doc.command} --cfg job [overrides]. Full tracebacks: debug=true.",
        "Hydra's own flags (-m to sweep, --cfg, --info): --hydra-help.",
    ]
    return "\n".join(lines)


def _value(root: DictConfig, key: str) -> str:
    """``key``'s value in ``root`` as written in the config (interpolations unresolved); ``-`` when absent."""
    parent_key, _, name = key.rpartition(".")
    parent = root if not parent_key else OmegaConf.select(root, parent_key, default=None)
    if not isinstance(parent, DictConfig) or name not in list(parent):  # `in` skips ??? values
        return "-"
    if OmegaConf.is_missing(parent, name):
        return "???"
    value = OmegaConf.to_container(parent, resolve=False)[name]
    if isinstance(value, (dict, list, DictConfig, ListConfig)):
        return json.dumps(value)
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def _groups(root: DictConfig) -> list[tuple[str, str | None, list[str]]]:
    """``(group, choice, options)`` for each config group the composed command uses (Hydra's own left out)."""
    choices = OmegaConf.select(root, "hydra.runtime.choices", default=None)
    if choices is None:
        return []
    loader = GlobalHydra.instance().config_loader() if GlobalHydra.instance().is_initialized() else None
    groups = []
    for group, choice in sorted(choices.items()):
        if group == "hydra" or str(group).startswith("hydra/"):
            continue
        options = loader.get_group_options(str(group), results_filter=ObjectType.CONFIG) if loader else []
        groups.append((str(group), choice, sorted(options)))
    return groups


def wants_help(args: list[str]) -> bool:
    """Whether a command line asks for the command's help (``--help`` or ``-h``)."""
    return any(arg in HELP_FLAGS for arg in args)


def command_help(doc: CommandDoc, config_name: str, overrides: list[str]) -> str:
    """The help of the command ``doc`` describes, its config ``conf/<config_name>.yaml`` composed with ``overrides``."""
    with _hydra_initialized():
        root = compose(config_name=config_name, overrides=list(overrides), return_hydra_config=True)
        return help_text(doc, root)


@contextmanager
def _hydra_initialized() -> Iterator[None]:
    """Hydra initialised with the project's configs for the block (as it is already inside a running app)."""
    if GlobalHydra.instance().is_initialized():
        yield
        return
    with initialize_config_module(CONF_MODULE, version_base=VERSION_BASE):
        yield
