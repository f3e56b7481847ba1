"""Run the console scripts the way a user does, in a subprocess."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path


def cli_command(command: str, *overrides: str, cwd: Path) -> tuple[list[str], dict[str, str]]:
    """The argv and environment that run ``command`` (an ``lf-*`` script) with Hydra's files under ``cwd``."""
    executable = shutil.which(command) or str(Path(sys.executable).parent / command)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "HYDRA_FULL_ERROR": "0"}
    argv = [executable, *overrides, f"hydra.run.dir={cwd / 'hydra'}", f"hydra.sweep.dir={cwd / 'multirun'}"]
    return argv, env


def run_cli(command: str, *overrides: str, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run ``command`` with Hydra overrides; Hydra's own files go under ``cwd``."""
    argv, env = cli_command(command, *overrides, cwd=cwd)
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
