"""Every ``lf-*`` command answers a user's first mistakes plainly, and its ``--help`` teaches.

Each bad input runs through the command's console entry point (its ``main``, with the command
line in ``sys.argv``) in this process: the same argument parsing and error path as the installed
script, without a new interpreter's seconds of imports per case (so these are unit tests: seconds). One
case runs the real script in a subprocess, so the path from the shell is covered too (marked slow).
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.integration.cli import CliResult, run_cli, run_in_process
from tests.pickles import CodePayload, save_original_sd_ckpt

USER_ERROR_EXIT = 2
NEVER = ("Traceback", "weights_only=False", "HYDRA_FULL_ERROR", "Error in call to target", "+trainer.")
"""What no plain error shows: a traceback, unsafe advice, Hydra's stock hints."""


@pytest.fixture(scope="module")
def bad(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bad inputs of the table: random bytes named .ckpt, a pickle that would run code, an
    original SD .ckpt (not a training checkpoint), a photo folder with one image that does not decode."""
    root = tmp_path_factory.mktemp("bad_inputs")
    (root / "garbage.ckpt").write_bytes(np.random.default_rng(0).bytes(4096))
    with (root / "evil.ckpt").open("wb") as handle:
        pickle.dump({"state_dict": {"w": CodePayload(root / "executed")}}, handle)
    save_original_sd_ckpt({"model.diffusion_model.w": torch.ones(2)}, root / "sd-v1-5.ckpt")
    photos = root / "photos"
    photos.mkdir()
    for index in range(2):
        Image.new("RGB", (16, 16), (index * 90, 30, 60)).save(photos / f"ok{index}.png")
        (photos / f"ok{index}.txt").write_text("a square")
    (photos / "broken.png").write_bytes(b"not an image")
    (photos / "broken.txt").write_text("a broken square")
    return root


@dataclass(frozen=True)
class Case:
    """A bad command line (``{bad}`` and ``{tmp}`` filled in) and what its error must name."""

    command: str
    args: tuple[str, ...]
    where: tuple[str, ...]
    fix: str

    def argv(self, bad: Path, tmp: Path) -> list[str]:
        return [arg.format(bad=bad, tmp=tmp) for arg in self.args]


CASES = {
    "export-random-bytes": Case(
        "lf-export",
        ("ckpt_path={bad}/garbage.ckpt", "out_dir={tmp}/x"),
        ("garbage.ckpt", "not a PyTorch checkpoint"),
        "give a checkpoint lf-train wrote",
    ),
    "export-code-pickle": Case(
        "lf-export",
        ("ckpt_path={bad}/evil.ckpt", "out_dir={tmp}/x"),
        ("evil.ckpt", "names pathlib.Path.touch"),
        "get the model as .safetensors",
    ),
    "export-original-sd-ckpt": Case(
        "lf-export",
        ("ckpt_path={bad}/sd-v1-5.ckpt", "out_dir={tmp}/x"),
        ("sd-v1-5.ckpt", "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint"),
        "sd-v1-5.ckpt allow_pickle=true",
    ),
    "import-pickle": Case(
        "lf-import",
        ("pretrained={bad}/evil.ckpt", "out_dir={tmp}/x"),
        ("evil.ckpt", "a pickle (.ckpt) is refused"),
        "allow_pickle=true",
    ),
    "import-code-pickle-allowed": Case(
        "lf-import",
        ("pretrained={bad}/evil.ckpt", "out_dir={tmp}/x", "allow_pickle=true"),
        ("evil.ckpt", "names pathlib.Path.touch"),
        "get the model as .safetensors",
    ),
    "sample-no-model": Case(
        "lf-sample", ("model_dir={tmp}/nonexistent",), ("model_dir=", "does not exist"), "lf-export's out_dir"
    ),
    "shards-undecodable": Case(
        "lf-shards",
        ("source=folder", "source.root={bad}/photos", "out_dir={tmp}/raw"),
        ("broken.png", "does not decode"),
        "on_bad_sample=skip",
    ),
    "train-no-arguments": Case("lf-train", (), ("data.train_dir is not set",), "lf-train data.train_dir="),
    "train-unknown-key": Case(
        "lf-train", ("trainer.max_stesp=2",), ("unknown key trainer.max_stesp",), "did you mean trainer.max_steps=2"
    ),
    "train-no-option": Case("lf-train", ("model=tinyy",), ("model=tinyy: no such option",), "did you mean model=tiny"),
    "train-no-latents": Case(
        "lf-train", ("data.train_dir={tmp}/nonexistent",), ("nonexistent/manifest.json",), "run lf-precompute"
    ),
    "autoencoder-no-arguments": Case(
        "lf-train-autoencoder", (), ("data.shards is not set",), "lf-train-autoencoder data.shards="
    ),
    "precompute-no-shards": Case(
        "lf-precompute",
        ("shards={tmp}/nonexistent", "out_dir={tmp}/latents", "pretrained={tmp}/model"),
        ("nonexistent: shard path does not exist",),
        "lf-shards' out_dir",
    ),
    "validate-no-shards": Case(
        "lf-validate", ("shards={tmp}/nonexistent",), ("nonexistent: shard path does not exist",), "a glob"
    ),
    "export-not-set": Case("lf-export", (), ("ckpt_path is not set",), "lf-export ckpt_path="),
    "sweep-summary-no-folder": Case(
        "lf-sweep-summary", ("sweep_dir={tmp}/nonexistent",), ("sweep_dir=", "does not exist"), "lf-train -m"
    ),
    "demo-unknown-key": Case("lf-demo", ("train_step=5",), ("unknown key train_step",), "did you mean train_steps=5"),
}


def error_lines(result: CliResult, command: str) -> list[str]:
    """The lines from the command's ``error:`` line on (what the user reads of the error)."""
    lines = result.stderr.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"{command}: error: "))
    return lines[start:]


@pytest.mark.parametrize("name", list(CASES))
def test_a_mistake_is_one_or_two_plain_lines_naming_where_and_the_fix(name, bad, tmp_path):
    case = CASES[name]
    result = run_in_process(case.command, *case.argv(bad, tmp_path), cwd=tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode == USER_ERROR_EXIT, output[-3000:]
    assert not [never for never in NEVER if never in output], output[-3000:]
    lines = error_lines(result, case.command)
    assert len(lines) <= 2, lines
    text = "\n".join(lines)
    assert all(where in text for where in case.where), text
    assert case.fix in text, text
    assert not (bad / "executed").exists(), "a pickle's code ran"


@pytest.mark.slow  # a new interpreter's imports: about 12 s
def test_the_installed_script_answers_the_same_from_the_shell(tmp_path):
    result = run_cli("lf-train", "trainer.max_stesp=2", cwd=tmp_path, timeout=120)
    assert result.returncode == USER_ERROR_EXIT
    assert "Traceback" not in result.stderr and "+trainer.max_stesp" not in result.stderr
    assert error_lines(result, "lf-train") == [
        "lf-train: error: unknown key trainer.max_stesp",
        "  fix: did you mean trainer.max_steps=2 or trainer.max_epochs=2? (lf-train --help: the main keys)",
    ]


@pytest.mark.parametrize("switch", ["debug=true", "HYDRA_FULL_ERROR=1"])
def test_debug_shows_the_whole_traceback(switch, tmp_path):
    full_error = switch == "HYDRA_FULL_ERROR=1"
    args = () if full_error else (switch,)
    result = run_in_process("lf-sample", f"model_dir={tmp_path}/x", *args, cwd=tmp_path, full_error=full_error)
    assert result.returncode == 1
    assert "Traceback" in result.stderr and "DataError: model_dir=" in result.stderr


def test_an_unexpected_error_keeps_its_traceback(tmp_path, monkeypatch):
    def broken(cfg):
        raise RuntimeError("a bug, not a user's mistake")

    monkeypatch.setattr("trainer.cli.export.run_export", broken)
    result = run_in_process("lf-export", "ckpt_path=x", "out_dir=y", cwd=tmp_path)
    assert result.returncode == 1
    assert "Traceback" in result.stderr and "RuntimeError: a bug, not a user's mistake" in result.stderr


COMMANDS = sorted(e.name for e in entry_points(group="console_scripts") if e.value.startswith("trainer.cli."))
GROUPS_NOT_USED = {"lf-train": "source:", "lf-shards": "strategy:", "lf-demo": "source:"}
"""A config group of ``conf/`` each of these commands does not use (its help must not list it)."""


@pytest.mark.parametrize("command", COMMANDS)
def test_help_says_what_the_command_does_with_examples_and_keys(command, tmp_path):
    result = run_in_process(command, "--help", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    head, _, description = lines[0].partition(": ")
    assert head == command and len(description) > 20, lines[0]
    examples = lines[lines.index("Examples:") + 1 :]
    examples = examples[: examples.index("")]
    assert 2 <= len(examples) <= 4 and all(e.startswith(f"  {command} ") for e in examples), examples
    assert any(line.startswith("Main keys") for line in lines), result.stdout
    assert GROUPS_NOT_USED.get(command, "no such group") not in result.stdout, result.stdout
    assert "Traceback" not in result.stderr
