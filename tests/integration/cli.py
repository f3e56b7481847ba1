"""Run the console scripts the way a user does, in a subprocess."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path


def run_cli(command: str, *overrides: str, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run ``command`` (an ``lf-*`` script) with Hydra overrides; Hydra's own files go under ``cwd``."""
    executable = shutil.which(command) or str(Path(sys.executable).parent / command)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "HYDRA_FULL_ERROR": "0"}
    return subprocess.run(
        [executable, *overrides, f"hydra.run.dir={cwd / 'hydra'}", f"hydra.sweep.dir={cwd / 'multirun'}"],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
