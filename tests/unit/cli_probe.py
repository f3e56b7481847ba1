"""Run ``lf-*`` entry points in a fresh interpreter and report what they imported and registered.

``python -m tests.unit.cli_probe imports``: import every module of :mod:`trainer.cli`, then run one
``main`` (``lf-validate --help``); print, as JSON, what was registered after each step.
``python -m tests.unit.cli_probe run '[["lf-train", "--help"], ...]'``: run each command line through
its console entry point, as the installed script would, in this one interpreter; print, as JSON, each
one's exit status, output and the heavy modules loaded by then.
``python -m tests.unit.cli_probe preempt``: a command (``@lf_command``, as every ``lf-*``) whose job
prints ``waiting``, waits for SIGTERM or SIGUSR1, and raises ``Preempted`` as training does after its
checkpoint: how every command ends a preemption, in about a second.

Importing this module imports nothing of the project, so what the report shows is what the probed
code loaded (its tests run it with ``subprocess``: ``sys.modules`` is the interpreter's own).
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import logging
import os
import pkgutil
import sys
import warnings
from importlib.metadata import entry_points
from typing import Any

HEAVY = ("torch", "lightning", "diffusers", "transformers", "deepspeed")
"""Frameworks that ``--help`` and config errors must not import (seconds each)."""
RESOLVERS = ("lf_sweep_group", "lf_on_cuda", "lf_default_precision", "lf_fused_optimizer", "lf_loader_workers")
FILTERED_LOGGERS = (
    "transformers.utils.import_utils",
    "lightning.pytorch.utilities.rank_zero",
    "diffusers.models.modeling_utils",
)
SWEEPER = "hydra_plugins.latentforge_sweepers.resumable_optuna.ResumableOptunaSweeper"


def heavy_loaded() -> list[str]:
    """The :data:`HEAVY` frameworks in ``sys.modules``."""
    return sorted(name for name in HEAVY if name in sys.modules)


def registrations() -> dict[str, Any]:
    """What is registered now: resolvers, log filters, warning filters of :mod:`trainer.cli.quiet`, the sweeper."""
    from hydra.core.plugins import Plugins
    from omegaconf import OmegaConf

    return {
        "resolvers": [name for name in RESOLVERS if OmegaConf.has_resolver(name)],
        "log_filters": [name for name in FILTERED_LOGGERS if logging.getLogger(name).filters],
        "warning_filters": [
            str(f[1].pattern) for f in warnings.filters if f[1] is not None and "LeafSpec" in f[1].pattern
        ],
        "sweeper": SWEEPER in Plugins.instance().class_name_to_class,
        "heavy": heavy_loaded(),
    }


def run(command: str, args: list[str]) -> dict[str, Any]:
    """Run ``command``'s entry point with ``args`` (Hydra's files under the current folder)."""
    from hydra.core.global_hydra import GlobalHydra

    (entry,) = [e for e in entry_points(group="console_scripts") if e.name == command]
    main = entry.load()
    stdout, stderr = io.StringIO(), io.StringIO()
    sys.argv = [command, *args, f"hydra.run.dir={os.getcwd()}/hydra"]
    os.environ.pop("HYDRA_FULL_ERROR", None)
    GlobalHydra.instance().clear()
    code: Any = 0
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        try:
            main()
        except SystemExit as error:
            code = error.code
    GlobalHydra.instance().clear()
    return {"exit": code, "stdout": stdout.getvalue(), "stderr": stderr.getvalue(), "heavy": heavy_loaded()}


def preempted_command() -> None:
    """An ``@lf_command`` whose job waits for a preemption signal and ends as a preempted training run."""
    import time

    from omegaconf import DictConfig

    from trainer.cli.command import lf_command
    from trainer.faults.signals import Preempted, PreemptionSignals

    @lf_command("validate")
    def wait_for_preemption(cfg: DictConfig) -> None:
        signals = PreemptionSignals()
        signals.install()
        print("waiting", flush=True)
        while signals.request is None:
            time.sleep(0.01)
        raise Preempted(signals.request.signal_name, 7, "checkpoints/last.ckpt")

    sys.argv = ["lf-probe", "shards=unused", f"hydra.run.dir={os.getcwd()}/hydra"]
    wait_for_preemption()


def main() -> None:
    mode = sys.argv[1]
    if mode == "preempt":
        preempted_command()
        return
    if mode == "imports":
        before = registrations()
        package = importlib.import_module("trainer.cli")
        names = [f"trainer.cli.{m.name}" for m in pkgutil.iter_modules(package.__path__)]
        for name in names:
            importlib.import_module(name)
        imported = registrations()
        run("lf-validate", ["--help"])
        report = {"modules": names, "before": before, "imported": imported, "after_main": registrations()}
    else:
        report = [{"argv": argv, **run(argv[0], argv[1:])} for argv in json.loads(sys.argv[2])]
    print(json.dumps(report))


if __name__ == "__main__":
    main()
