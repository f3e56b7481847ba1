"""Every ``lf-*`` command ends a preemption as ``lf-train`` does: one line, exit status 75.

The shared path is :func:`trainer.cli.preempted.ending_preemption`, which ``@lf_command`` wraps every
job in; a real SIGTERM to a cheap command (:mod:`tests.unit.cli_probe`, ``preempt``) goes through it.
"""

from __future__ import annotations

import importlib.util
import re
import signal
import subprocess
import sys
import types
from importlib.metadata import entry_points
from pathlib import Path

import pytest

from trainer.cli.preempted import BEFORE_FIRST_STEP, ending_preemption
from trainer.faults.signals import PREEMPTED_EXIT_CODE, Preempted

PROBE = Path(__file__).with_name("cli_probe.py")
LF_COMMAND = re.compile(r"^@lf_command\(", re.M)


@pytest.mark.parametrize("signal_name", ["SIGTERM", "SIGUSR1"])
def test_a_preempted_command_prints_one_line_and_exits_75(signal_name, tmp_path):
    process = subprocess.Popen(
        [sys.executable, str(PROBE), "preempt"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert process.stdout is not None
        assert process.stdout.readline().strip() == "waiting"  # its handler is installed
        process.send_signal(getattr(signal, signal_name))
        output, _ = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == PREEMPTED_EXIT_CODE, output
    assert "Traceback" not in output, output
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert lines[0].endswith(
        f"preempted by {signal_name} at step 7; checkpoint checkpoints/last.ckpt; run the same command again to resume"
    )


def test_lightnings_sigterm_before_the_first_step_ends_the_same_way(monkeypatch, caplog):
    # Lightning's SIGTERMException is a SystemExit; a stand-in module keeps this test from importing Lightning.
    exceptions = types.ModuleType("lightning.pytorch.utilities.exceptions")
    exceptions.SIGTERMException = type("SIGTERMException", (SystemExit,), {})
    monkeypatch.setitem(sys.modules, exceptions.__name__, exceptions)
    with pytest.raises(SystemExit) as stop, ending_preemption():
        raise exceptions.SIGTERMException(1)
    assert stop.value.code == PREEMPTED_EXIT_CODE and type(stop.value) is SystemExit
    assert [r.getMessage() for r in caplog.records] == [BEFORE_FIRST_STEP]


def test_other_exits_and_errors_pass_through():
    with pytest.raises(SystemExit) as stop, ending_preemption():
        raise SystemExit(2)
    assert stop.value.code == 2
    with pytest.raises(ValueError), ending_preemption():
        raise ValueError("not a preemption")
    with pytest.raises(SystemExit) as stop, ending_preemption():
        raise Preempted("SIGUSR1", 3, "")
    assert stop.value.code == PREEMPTED_EXIT_CODE


@pytest.mark.parametrize(
    "script", sorted(e for e in entry_points(group="console_scripts") if e.value.startswith("trainer.cli."))
)
def test_every_command_runs_its_job_through_lf_command(script):
    # lf_command wraps every job in ending_preemption: a command of its own would skip it.
    module = script.value.partition(":")[0]
    source = Path(importlib.util.find_spec(module).origin)
    assert len(LF_COMMAND.findall(source.read_text())) == 1, module
