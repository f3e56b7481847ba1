"""The GPU benches run on a CPU in their smoke mode, so a lent GPU's minutes are not lost to a bench
that no longer composes (a callback added to ``lf-train``'s defaults once broke ``bench/gpu_train.py``
and was found only on the GPU)."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # each bench starts a new interpreter and trains: about 2 minutes in all

ROOT = Path(__file__).resolve().parents[2]


def run_bench(*argv: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, *argv], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def table_rows(stdout: str) -> dict[str, list[str]]:
    """The Markdown table's rows by configuration name (header and rule left out)."""
    rows = [line.strip("|").split("|") for line in stdout.splitlines() if line.startswith("| ")]
    return {cells[0].strip(): [c.strip() for c in cells[1:]] for cells in rows[1:] if not cells[0].startswith(" ---")}


@pytest.mark.parametrize(
    ("model", "configs"),
    [
        ("tiny", "plain,single,zero2,zero2_big_buckets"),
        ("tiny", "plain,compiled,compiled_cudagraphs"),  # a recipe candidate's compile options give way on CPU
        ("sdxl_tiny", "plain,single"),
    ],
)
def test_training_bench_measures_each_configuration_on_cpu(model: str, configs: str):
    stdout = run_bench(
        "bench/gpu_train.py", "--model", model, "--accelerator", "cpu", "--precision", "bf16-mixed",
        "--resolution", "32", "--batch", "4", "--steps", "2", "--warmup", "1", "--configs", configs,
    )  # fmt: skip
    rows = table_rows(stdout)
    assert set(rows) == set(configs.split(",")), stdout
    for name, cells in rows.items():
        images_per_second = float(cells[0])
        assert math.isfinite(images_per_second) and images_per_second > 0, (name, cells)
    last = configs.split(",")[-1]
    assert f"measured {last}:" in stdout, "each row is printed as soon as it is measured"
    assert f"ratio {last} / plain (img/s):" in stdout
    if last.startswith("zero"):  # a DeepSpeed variant's overrides compose (keys that exist) and it runs
        assert f"ratio {last} / single (img/s):" in stdout
    if last.startswith("compiled_"):  # a candidate for the default recipe, against the recipe
        assert f"ratio {last} / compiled (img/s):" in stdout


def test_precompute_bench_compares_both_sides_on_cpu():
    stdout = run_bench(
        "bench/gpu_precompute.py", "--vae", "tiny", "--text-encoder", "tiny", "--device", "cpu", "--dtype", "float32",
        "--resolution", "32", "--images", "32", "--batch", "8", "--workers", "0",
    )  # fmt: skip
    rates = [float(line.split("on CPU:")[1].split("img/s")[0]) for line in stdout.splitlines() if "on CPU:" in line]
    # the steady rate is a difference of two timings: on 32 tiny images it may drown in noise (then nan, said so)
    plain, whole, steady = rates
    assert plain > 0 and whole > 0 and (steady > 0 or math.isnan(steady)), stdout
    assert "ratio lf-precompute (steady) / plain (img/s):" in stdout
