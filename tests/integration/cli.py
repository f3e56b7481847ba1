"""Run the console scripts the way a user does, in a subprocess."""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path

from hydra.core.global_hydra import GlobalHydra

from tests.conftest import run_variable


def cli_command(
    command: str, *overrides: str, cwd: Path, env: dict[str, str] | None = None
) -> tuple[list[str], dict[str, str]]:
    """The argv and environment (plus ``env``) that run ``command`` (an ``lf-*`` script); Hydra files go in ``cwd``.

    The environment is this process's without the run variables an in-process run of a test may have
    set (``MASTER_PORT``, Lightning's seed), as a user's shell starts a command.
    """
    executable = shutil.which(command) or str(Path(sys.executable).parent / command)
    inherited = {key: value for key, value in os.environ.items() if not run_variable(key)}
    env = {**inherited, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "HYDRA_FULL_ERROR": "0", **(env or {})}
    argv = [executable, *overrides, f"hydra.run.dir={cwd / 'hydra'}", f"hydra.sweep.dir={cwd / 'multirun'}"]
    return argv, env


def run_cli(
    command: str, *overrides: str, cwd: Path, timeout: int = 300, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """Run ``command`` with Hydra overrides (and ``env``); Hydra's own files go under ``cwd``."""
    argv, env = cli_command(command, *overrides, cwd=cwd, env=env)
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def kill_cli_when(path: Path, command: str, *overrides: str, cwd: Path) -> None:
    """Start ``command`` in a process group of its own; SIGKILL the whole group once ``path`` exists.

    The group holds every process the command starts (the other ranks of a DDP or DeepSpeed run),
    so all of them die at once, as on a lost node; none is running when this returns.

    Raises:
        AssertionError: the command ended before ``path`` appeared.
    """
    argv, env = cli_command(command, *overrides, cwd=cwd)
    process = subprocess.Popen(
        argv, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    try:
        while not path.exists():
            assert process.poll() is None, f"{command} ended before it was killed"
            time.sleep(0.05)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


@dataclass
class CliResult:
    """What a command run in this process printed, and its exit status."""

    returncode: int
    stdout: str
    stderr: str


def run_in_process(command: str, *overrides: str, cwd: Path, full_error: bool = False) -> CliResult:
    """Run the console script ``command``'s entry point in this process, as its command line would
    (the same ``main``, the same argument parsing and error path), without the seconds of a new
    interpreter's imports. Hydra's own files go under ``cwd``; ``full_error`` runs it with
    ``HYDRA_FULL_ERROR=1``.
    """
    (entry,) = [e for e in entry_points(group="console_scripts") if e.name == command]
    main = entry.load()
    argv = [command, *overrides, f"hydra.run.dir={cwd / 'hydra'}", f"hydra.sweep.dir={cwd / 'multirun'}"]
    stdout, stderr = io.StringIO(), io.StringIO()
    saved_argv, saved_env = sys.argv, os.environ.get("HYDRA_FULL_ERROR")
    os.environ.pop("HYDRA_FULL_ERROR", None)
    if full_error:
        os.environ["HYDRA_FULL_ERROR"] = "1"
    GlobalHydra.instance().clear()
    code = 0
    try:
        sys.argv = argv
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            try:
                main()
            except SystemExit as error:
                code = error.code if isinstance(error.code, int) else 1
            except Exception:  # what would reach the interpreter: its traceback, status 1
                traceback.print_exc()
                code = 1
    finally:
        sys.argv = saved_argv
        GlobalHydra.instance().clear()
        os.environ.pop("HYDRA_FULL_ERROR", None)
        if saved_env is not None:
            os.environ["HYDRA_FULL_ERROR"] = saved_env
    return CliResult(code, stdout.getvalue(), stderr.getvalue())
