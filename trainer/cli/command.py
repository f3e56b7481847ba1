"""``@lf_command``: what ``@hydra.main`` is for every ``lf-*`` console script, with one error path.

Usage (the whole of an entry point)::

    @lf_command("train")                  # conf/train.yaml
    def main(cfg: DictConfig) -> None:
        run_train(cfg)

An expected mistake, wherever it happens (while Hydra composes the config, or inside the command),
is printed as one or two plain lines by :func:`trainer.cli.errors.explain` and the command exits
with status :data:`USER_ERROR_EXIT`; anything else keeps its traceback. ``HYDRA_FULL_ERROR=1`` or
``debug=true`` on the command line shows every error in full.

How the errors get here: Hydra prints an exception raised while it composes the config (in its
``run_and_report``) unless ``HYDRA_FULL_ERROR`` is set, in which case it raises it. So the command
sets that variable while Hydra composes, catches what Hydra raises, and restores the user's value
as the job starts, so the processes the job starts (other ranks) and Hydra's report of an
unexpected error in the job behave as the user asked. Errors inside the job are caught in the job.

``--help`` (or ``-h``) is answered here, not by Hydra (:mod:`trainer.cli.help` says why);
``--hydra-help`` and Hydra's other flags go to Hydra.

Answers at once: the command's ``main`` registers what the configs need (the resolvers, the log
filters, the command's ``setup``, e.g. a Hydra plugin) before Hydra composes; nothing is registered on
import, and the console-script modules import no torch-ecosystem framework (their jobs import it), so
``--help``, ``--cfg job``, an unknown key and a value left ``???`` (:func:`check_mandatory_values`,
before the job) answer in the time Hydra takes. A preempted job ends with one line and exit status 75
(:func:`trainer.cli.preempted.ending_preemption`).
"""

from __future__ import annotations

import functools
import os
import re
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import hydra
from omegaconf import DictConfig, OmegaConf

from lf_common import object_store
from trainer.cli.command_doc import CommandDoc
from trainer.cli.errors import ErrorContext, explain
from trainer.cli.help import command_help, wants_help
from trainer.cli.hydra_app import CONF_DIR, VERSION_BASE, compose_config, register_resolvers
from trainer.cli.preempted import ending_preemption
from trainer.cli.quiet import quiet_import_noise

T = TypeVar("T")
FULL_ERROR_ENV = "HYDRA_FULL_ERROR"
"""Hydra's switch for full tracebacks; ``debug=true`` sets it."""
USER_ERROR_EXIT = 2
"""Exit status of an expected mistake (an unexpected error exits with 1, as Python and Hydra do)."""
_DEBUG = re.compile(r"^\+{0,2}debug=(\w+)$", re.IGNORECASE)
_FLAGS_WITH_VALUE = frozenset(["--config-path", "-cp", "--config-name", "-cn", "--config-dir", "-cd"])
_MISSING = "???"
_REFERENCE = re.compile(r"\$\{([A-Za-z_][\w.]*)")


def lf_command(
    config_name: str,
    setup: Callable[[], None] | None = None,
    may_stay_missing: tuple[str, ...] | Callable[[DictConfig], tuple[str, ...]] = (),
) -> Callable[[Callable[[DictConfig], T]], Callable[..., T | None]]:
    """``@hydra.main`` for ``conf/<config_name>.yaml``, with the plain error path and the command's help.

    The decorated function's module docstring gives the help text (:class:`CommandDoc`) and the
    examples that error messages show.

    Args:
        config_name: the command's config, ``conf/<config_name>.yaml``.
        setup: what the command registers before Hydra composes (called by ``main``, never on import).
        may_stay_missing: keys the job reads only in some cases, left ``???`` in the others (the job
            checks them): :func:`check_mandatory_values` passes them over.
    """

    def decorate(task: Callable[[DictConfig], T]) -> Callable[..., T | None]:
        state = _ErrorSwitch()

        def context() -> ErrorContext:
            return ErrorContext(
                doc=CommandDoc.of_module(task.__module__),
                overrides=overrides_of(sys.argv[1:]),
                compose=lambda overrides: compose_config(config_name, overrides),
            )

        @functools.wraps(task)
        def job(cfg: DictConfig) -> T:
            state.restore()
            with plain_errors(context, state), ending_preemption():
                check_mandatory_values(cfg, may_stay_missing(cfg) if callable(may_stay_missing) else may_stay_missing)
                object_store.set_endpoint_url(cfg.get("s3_endpoint_url"))
                return task(cfg)

        hydra_main = hydra.main(version_base=VERSION_BASE, config_path=CONF_DIR, config_name=config_name)(job)

        @functools.wraps(task)
        def main(cfg: DictConfig | None = None) -> T | None:
            register(setup)
            if cfg is not None:  # called with a config, as @hydra.main allows: no command line to report on
                return hydra_main(cfg)
            take_debug_switch(sys.argv)
            with state.hydra_raises(), plain_errors(context, state):
                if wants_help(sys.argv[1:]):
                    print(command_help(CommandDoc.of_module(task.__module__), config_name, overrides_of(sys.argv[1:])))
                    return None
                return hydra_main()

        return main

    return decorate


def register(setup: Callable[[], None] | None = None) -> None:
    """What a command registers when its ``main`` runs: the log filters of :func:`quiet_import_noise`, the
    configs' resolvers, and the command's own ``setup``. Idempotent."""
    quiet_import_noise()
    register_resolvers()
    if setup is not None:
        setup()


def check_mandatory_values(cfg: DictConfig, may_stay_missing: tuple[str, ...] = ()) -> None:
    """Refuse a value left ``???`` before the job imports anything heavy, as reading it would later.

    A ``???`` that another value refers to (``vae_path: ${pretrained}/vae``) is left to that value:
    setting every value that refers to it is another way to give it.

    Raises:
        MissingMandatoryValue: for the first such key in the config's order (OmegaConf's own error,
            with its ``full_key``).
    """
    values = _dotted_values(OmegaConf.to_container(cfg, resolve=False))
    referred = {name for value in values.values() if isinstance(value, str) for name in _REFERENCE.findall(value)}
    for key, value in values.items():
        if value == _MISSING and key not in referred and key not in may_stay_missing:
            OmegaConf.select(cfg, key, throw_on_missing=True)


def _dotted_values(container: Any, prefix: str = "") -> dict[str, Any]:
    """Every leaf of a plain container by its dotted key (list items by index), in the config's order."""
    if isinstance(container, dict):
        items = ((str(name), child) for name, child in container.items())
    elif isinstance(container, list):
        items = ((str(index), child) for index, child in enumerate(container))
    else:
        return {prefix: container} if prefix else {}
    values: dict[str, Any] = {}
    for name, child in items:
        values.update(_dotted_values(child, f"{prefix}.{name}" if prefix else name))
    return values


class _ErrorSwitch:
    """``HYDRA_FULL_ERROR`` as the user set it, and while Hydra composes (set, so Hydra raises)."""

    def __init__(self) -> None:
        self.user_value: str | None = None
        self.active = False

    @property
    def full_errors(self) -> bool:
        """Whether the user asked for full tracebacks (``HYDRA_FULL_ERROR=1`` or ``debug=true``)."""
        value = self.user_value if self.active else os.environ.get(FULL_ERROR_ENV)
        return value == "1"

    @contextmanager
    def hydra_raises(self) -> Iterator[None]:
        """Set ``HYDRA_FULL_ERROR=1`` for the block (until :meth:`restore`), so Hydra raises what it would print."""
        self.user_value, self.active = os.environ.get(FULL_ERROR_ENV), True
        os.environ[FULL_ERROR_ENV] = "1"
        try:
            yield
        finally:
            self.restore()

    def restore(self) -> None:
        """Give ``HYDRA_FULL_ERROR`` back its user's value."""
        if not self.active:
            return
        if self.user_value is None:
            os.environ.pop(FULL_ERROR_ENV, None)
        else:
            os.environ[FULL_ERROR_ENV] = self.user_value
        self.active = False


@contextmanager
def plain_errors(context: Callable[[], ErrorContext], state: _ErrorSwitch) -> Iterator[None]:
    """Print an expected mistake raised in the block plainly and exit with :data:`USER_ERROR_EXIT`;
    re-raise anything else, and everything when the user asked for full tracebacks."""
    try:
        yield
    except Exception as error:
        if state.full_errors:
            raise
        known = context()
        plain = explain(error, known)
        if plain is None:
            raise
        sys.stdout.flush()
        print("\n".join(plain.lines(known.doc.command)), file=sys.stderr, flush=True)
        raise SystemExit(USER_ERROR_EXIT) from None


def take_debug_switch(argv: list[str]) -> bool:
    """Remove ``debug=true|false`` from ``argv``; ``true`` sets ``HYDRA_FULL_ERROR=1`` (inherited by the
    processes the command starts). Returns whether full tracebacks were asked for."""
    switches = [arg for arg in argv[1:] if _DEBUG.match(arg)]
    for arg in switches:
        argv.remove(arg)
    if any(_DEBUG.match(arg).group(1).lower() in ("true", "1", "yes", "on") for arg in switches):
        os.environ[FULL_ERROR_ENV] = "1"
    return os.environ.get(FULL_ERROR_ENV) == "1"


def overrides_of(args: list[str]) -> list[str]:
    """The ``key=value`` overrides of a command line (Hydra's flags and their values left out)."""
    overrides, skip = [], False
    for arg in args:
        if skip:
            skip = False
        elif arg in _FLAGS_WITH_VALUE:
            skip = True
        elif not arg.startswith("-") and "=" in arg:
            overrides.append(arg)
    return overrides
