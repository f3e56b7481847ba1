"""Run the console scripts the way a user does, in a subprocess."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path


def cli_command(
    command: str, *overrides: str, cwd: Path, env: dict[str, str] | None = None
) -> tuple[list[str], dict[str, str]]:
    """The argv and environment (plus ``env``) that run ``command`` (an ``lf-*`` script); Hydra files go in ``cwd``."""
    executable = shutil.which(command) or str(Path(sys.executable).parent / command)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "HYDRA_FULL_ERROR": "0", **(env or {})}
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
