"""How long a command takes to answer ``--help`` and a typo, against a bare interpreter.

Each case runs as a user runs it, as a new process (the installed ``lf-train`` script), ``REPEATS`` times,
the cases interleaved so a busy machine slows all of them alike:

* ``python -c pass``: the interpreter alone, the floor;
* ``lf-train --help``;
* ``lf-train trainer.max_stesp=2``: a typo, answered with "did you mean trainer.max_steps=2";
* the frameworks a training job imports (``import torch, lightning, diffusers, transformers``): what every
  ``--help`` and config error paid before the commands imported them only when the job runs.

With ``--baseline BIN`` (the ``bin/`` of another install, e.g. an older checkout's venv), that install's
``lf-train --help`` and typo run beside this one's, interleaved, as the before.

Wall time depends on the machine's load; CPU time (user + system of the process) much less. The median
of each is printed, then the ratios to ``python -c pass`` (the last line: ``lf-train --help``'s).

Run: ``python bench/cli_latency.py [--repeats N] [--baseline /path/to/old/.venv/bin]``.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BIN = Path(sys.executable).parent
JOB_IMPORTS = "import torch, lightning, diffusers, transformers"


def cases(workdir: Path, baseline: Path | None) -> dict[str, list[str]]:
    """Each case's command line (Hydra's files in ``workdir``)."""
    hydra_dir = f"hydra.run.dir={workdir / 'hydra'}"
    before = {}
    if baseline is not None:
        before = {
            "baseline lf-train --help": [str(baseline / "lf-train"), "--help"],
            "baseline lf-train trainer.max_stesp=2": [str(baseline / "lf-train"), "trainer.max_stesp=2", hydra_dir],
        }
    return {
        "python -c pass": [sys.executable, "-c", "pass"],
        "lf-train --help": [str(BIN / "lf-train"), "--help"],
        "lf-train trainer.max_stesp=2": [str(BIN / "lf-train"), "trainer.max_stesp=2", hydra_dir],
        "job's imports": [sys.executable, "-c", JOB_IMPORTS],
        **before,
    }


def timed(argv: list[str], cwd: Path) -> tuple[float, float, int]:
    """Wall seconds, CPU seconds (user + system) and the exit status of one run of ``argv``."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, done.returncode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--baseline", type=Path, default=None, help="bin/ of another install: its lf-train too")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        runs = cases(workdir, args.baseline)
        walls: dict[str, list[float]] = {name: [] for name in runs}
        cpus: dict[str, list[float]] = {name: [] for name in runs}
        for _ in range(args.repeats):
            for name, argv in runs.items():
                wall, cpu, status = timed(argv, workdir)
                expected = 2 if "max_stesp" in name else 0
                assert status == expected, f"{name}: exit status {status}, expected {expected}"
                walls[name].append(wall)
                cpus[name].append(cpu)
    load = os.getloadavg()
    print(f"{os.cpu_count()} cores, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; {args.repeats} runs each")
    print("| case | wall s (median) | CPU s (median) | wall / python -c pass | CPU / python -c pass |")
    print("| --- | ---: | ---: | ---: | ---: |")
    floor_wall, floor_cpu = statistics.median(walls["python -c pass"]), statistics.median(cpus["python -c pass"])
    for name in runs:
        wall, cpu = statistics.median(walls[name]), statistics.median(cpus[name])
        print(f"| {name} | {wall:.2f} | {cpu:.2f} | {wall / floor_wall:.1f}x | {cpu / floor_cpu:.1f}x |")
    help_wall = statistics.median(walls["lf-train --help"])
    typo_wall = statistics.median(walls["lf-train trainer.max_stesp=2"])
    if args.baseline is not None:
        for case in ("lf-train --help", "lf-train trainer.max_stesp=2"):
            old, new = statistics.median(walls[f"baseline {case}"]), statistics.median(walls[case])
            old_cpu, new_cpu = statistics.median(cpus[f"baseline {case}"]), statistics.median(cpus[case])
            print(f"{case}: baseline / this (wall) {old / new:.1f}x, (CPU) {old_cpu / new_cpu:.1f}x")
    print(f"typo / python -c pass (wall): {typo_wall / floor_wall:.1f}x")
    print(f"lf-train --help / python -c pass (wall): {help_wall / floor_wall:.1f}x")


if __name__ == "__main__":
    main()
