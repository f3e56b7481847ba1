"""Commands answer at once: ``--help``, ``--cfg job`` and config errors import no torch-ecosystem framework,
and importing a command registers nothing until its ``main`` runs.

Each test starts one fresh interpreter (:mod:`tests.unit.cli_probe`) and runs several command lines in
it: ``sys.modules`` of this test process holds torch already.
"""

from __future__ import annotations

import json
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest

from trainer.cli.train import multirun_asked

PROBE = Path(__file__).with_name("cli_probe.py")
COMMANDS = sorted(e.name for e in entry_points(group="console_scripts") if e.value.startswith("trainer.cli."))
USER_ERROR_EXIT = 2


def probe(tmp_path: Path, *args: str) -> object:
    """Run the probe with ``args`` in ``tmp_path``; its JSON report."""
    result = subprocess.run(
        [sys.executable, str(PROBE), *args], cwd=tmp_path, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def run_lines(tmp_path: Path, lines: list[list[str]]) -> list[dict]:
    """Run each command line (``[script, *args]``) through its entry point in one fresh interpreter."""
    return probe(tmp_path, "run", json.dumps(lines))


def error_lines(stderr: str, command: str) -> list[str]:
    lines = stderr.splitlines()
    return lines[next(i for i, line in enumerate(lines) if line.startswith(f"{command}: error: ")) :]


def test_every_command_answers_help_without_torch_lightning_diffusers_transformers_or_deepspeed(tmp_path):
    results = run_lines(tmp_path, [[command, "--help"] for command in COMMANDS])
    for command, result in zip(COMMANDS, results, strict=True):
        assert result["exit"] in (0, None), (command, result["stderr"][-2000:])
        assert result["stdout"].startswith(f"{command}: "), (command, result["stdout"][:300])
        assert result["heavy"] == [], (command, result["heavy"])


def test_config_errors_and_cfg_job_answer_without_the_heavy_imports(tmp_path):
    lines = [
        ["lf-train", "trainer.max_stesp=2"],  # a typo: the same two lines as before
        ["lf-train", "--cfg", "job"],
        ["lf-train"],  # data.train_dir=??? refused before the job imports anything
        ["lf-export", "out_dir=x"],
        ["lf-shards", "source=digits"],  # out_dir may stay ??? only for an img2dataset folder
        ["lf-demo", "train_step=5"],
        ["lf-train", "data.train_dir=x", "trainer.accelerator=cpu", "trainer.precision=16-mixed"],  # refused
    ]
    typo, cfg_job, train, export, shards, demo, refused = run_lines(tmp_path, lines)
    assert typo["exit"] == USER_ERROR_EXIT and "Traceback" not in typo["stderr"]
    assert error_lines(typo["stderr"], "lf-train") == [
        "lf-train: error: unknown key trainer.max_stesp",
        "  fix: did you mean trainer.max_steps=2 or trainer.max_epochs=2? (lf-train --help: the main keys)",
    ]
    assert cfg_job["exit"] in (0, None) and "max_steps:" in cfg_job["stdout"], cfg_job["stderr"][-2000:]
    for result, command, key in [(train, "lf-train", "data.train_dir"), (export, "lf-export", "ckpt_path")]:
        assert result["exit"] == USER_ERROR_EXIT, result["stderr"][-2000:]
        assert error_lines(result["stderr"], command)[0].startswith(f"{command}: error: {key} is not set"), result
    assert error_lines(shards["stderr"], "lf-shards")[0].startswith("lf-shards: error: out_dir is not set")
    assert error_lines(demo["stderr"], "lf-demo")[0] == "lf-demo: error: unknown key train_step"
    assert refused["exit"] == USER_ERROR_EXIT
    assert "trainer.precision=16-mixed" in error_lines(refused["stderr"], "lf-train")[0]
    assert refused["heavy"] == [], "the last command line ran after all others: nothing heavy was imported"


def test_importing_the_commands_registers_nothing_until_main_runs(tmp_path):
    report = probe(tmp_path, "imports")
    nothing = {"resolvers": [], "log_filters": [], "warning_filters": [], "sweeper": False, "heavy": []}
    assert len(report["modules"]) >= len(COMMANDS)
    assert report["before"] == nothing
    assert report["imported"] == nothing, "importing trainer.cli.* registered or imported something"
    after = report["after_main"]
    assert "lf_sweep_group" in after["resolvers"] and "lf_default_precision" in after["resolvers"]
    assert "transformers.utils.import_utils" in after["log_filters"] and after["warning_filters"]
    assert not after["sweeper"], "the Optuna sweeper is registered for a multirun only"
    assert after["heavy"] == []


@pytest.mark.parametrize(
    ("args", "multirun"),
    [
        (["-m", "optim.lr=1e-4,3e-4"], True),
        (["--multirun"], True),
        (["hydra.mode=MULTIRUN"], True),
        (["optim.lr=1e-4"], False),
        (["--help"], False),
    ],
)
def test_lf_train_registers_the_sweeper_when_a_multirun_is_asked(args, multirun):
    assert multirun_asked(args) is multirun
