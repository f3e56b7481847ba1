"""Every command line in the code blocks of README.md, launch/README.md and docs/**/*.md composes its config
as the command would.

A line runs a console script of pyproject.toml (``lf-train ...``, after ``VAR=value`` assignments,
or as ``torchrun|python -m trainer.cli.X``) or a launcher of ``launch/`` (its ``--dry-run`` gives
the ``lf-*`` line it runs). The words are split as bash splits them, Hydra's flags are left out, a
bare ``...`` ("and the rest") is dropped, a placeholder ``<run>`` becomes ``run``, and a
``--multirun`` line is composed with the first value of each sweep (an interval's lower bound).
Files a block writes with a heredoc (a user's experiment) are written to a fresh ``$PWD``. A block fenced
as ``text`` is output, not commands.

A line followed by ``lf-X: error: ...`` in its block is an error example: composing it must still
fail with the lines shown, or (:data:`FAILS_AFTER_COMPOSING`) succeed, the command refusing later.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hydra import initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import IntervalSweep, Override, Transformer

from trainer.cli.command import FULL_ERROR_ENV, take_debug_switch
from trainer.cli.command_doc import CommandDoc
from trainer.cli.errors import ErrorContext, explain
from trainer.cli.hydra_app import CONF_MODULE, VERSION_BASE, compose_config
from trainer.cli.train import plan_switch

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parents[2]
DOCS = (
    "README.md",
    "launch/README.md",
    *sorted(path.relative_to(ROOT).as_posix() for path in ROOT.glob("docs/**/*.md")),
)
"""The files whose code blocks are read: README, the launchers' page and every page of the docs site."""
MIN_COMMAND_LINES = 90
FAILS_AFTER_COMPOSING = {
    "lf-export ckpt_path=sd-v1-5.ckpt out_dir=export": "the refusal comes from reading the file, which is not there",
}
"""Error examples whose error the command raises after composing (``script args``: why)."""

FENCE = re.compile(r"^\s*```\s*(\w*)")
OUTPUT_FENCES = frozenset({"text"})
ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
HEREDOC = re.compile(r"<<-?\s*['\"]?(\w+)['\"]?")
HEREDOC_TARGET = re.compile(r">\s*(\S+)")
PLACEHOLDER = re.compile(r"<(\w[\w ]*)>")
LF_COMMAND = re.compile(r"""@lf_command\(["'](\w+)["'][,)]""")
OPERATORS = frozenset({"&&", "||", ";", "|"})
WRAPPERS = frozenset({"env", "exec", "srun", "sbatch"})
PYTHON_LAUNCHERS = frozenset({"python", "python3", "torchrun"})
HYDRA_SWITCHES = frozenset({"-h", "--help", "--hydra-help", "--version", "--resolve", "-r", "--run"})
MULTIRUN = frozenset({"-m", "--multirun"})
HYDRA_FLAGS_WITH_VALUE = frozenset({"-c", "--cfg", "-p", "--package", "-sc", "--shell-completion"})
CONFIG_NAME_FLAGS = frozenset({"-cn", "--config-name"})
INFO_FLAGS = frozenset({"-i", "--info"})
INFO_TOPICS = frozenset({"all", "config", "defaults", "defaults-tree", "plugins", "searchpath"})


def console_scripts() -> dict[str, str]:
    """pyproject.toml's ``lf-*`` scripts and their modules."""
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    return {name: target.partition(":")[0] for name, target in scripts.items()}


def config_name_of(module: str) -> str:
    """The config an entry point composes: its ``@lf_command("...")``."""
    spec = importlib.util.find_spec(module)
    assert spec is not None and spec.origin is not None, module
    names = LF_COMMAND.findall(Path(spec.origin).read_text())
    assert len(names) == 1, f"{module}: one @lf_command expected, found {names}"
    return names[0]


SCRIPTS = console_scripts()
MODULES = {module: script for script, module in SCRIPTS.items()}
CONFIG_NAMES = {script: config_name_of(module) for script, module in SCRIPTS.items()}


@dataclass
class Example:
    """A command line of a fenced block: where it starts, its words and what the block shows after it.

    Attributes:
        doc: the file, relative to the repository.
        line: the line the command starts on.
        words: the shell words (comments out, continuation lines joined).
        output: the lines after a ``$ `` prompt's command, up to the next prompt.
        files: what the block wrote before the command with heredocs (path: text).
    """

    doc: str
    line: int
    words: list[str]
    output: list[str] = field(default_factory=list)
    files: dict[str, str] = field(default_factory=dict)

    @property
    def program(self) -> str:
        """The console script (or launcher) the line runs."""
        script = console_command(self.words)
        return script[0] if script else invoked(self.words)[0]

    @property
    def id(self) -> str:
        return f"{self.doc}:{self.line} {self.program}"

    @property
    def text(self) -> str:
        """The command from its program on, as the page shows it."""
        return shlex.join(invoked(self.words))

    @property
    def shown_error(self) -> bool:
        return bool(self.output) and self.output[0].startswith(f"{self.program}: error:")


def invoked(words: list[str]) -> list[str]:
    """``words`` from the program on: past ``VAR=value`` and wrappers (``env``, ``srun``, ...) with their flags."""
    rest = list(words)
    while rest:
        if ASSIGNMENT.match(rest[0]):
            rest.pop(0)
        elif rest[0] in WRAPPERS:
            rest.pop(0)
            while rest and rest[0].startswith("-"):
                rest.pop(0)
        else:
            break
    return rest


def console_command(words: list[str]) -> tuple[str, list[str]] | None:
    """The console script a command line runs and its arguments, or ``None`` for another program."""
    rest = invoked(words)
    if not rest:
        return None
    if rest[0] in SCRIPTS:
        return rest[0], rest[1:]
    if Path(rest[0]).name in PYTHON_LAUNCHERS and "-m" in rest[:-1]:
        module = rest[rest.index("-m") + 1]
        if module in MODULES:
            return MODULES[module], rest[rest.index("-m") + 2 :]
    return None


def runs_a_launcher(words: list[str]) -> bool:
    rest = invoked(words)
    return bool(rest) and rest[0].startswith("launch/") and (ROOT / rest[0]).is_file()


def fenced_blocks(text: str) -> Iterator[list[tuple[int, str]]]:
    """The numbered lines of each fenced code block (but those fenced as output: ``text``)."""
    block: list[tuple[int, str]] | None = None
    output = False
    for number, line in enumerate(text.splitlines(), start=1):
        if fence := FENCE.match(line):
            if block is not None and not output:
                yield block
            output = block is None and fence.group(1) in OUTPUT_FENCES
            block = [] if block is None else None
        elif block is not None:
            block.append((number, line))


def commands(words: list[str]) -> Iterator[list[str]]:
    """The simple commands of a line joined by ``&&``, ``||``, ``;`` or ``|``."""
    command: list[str] = []
    for word in [*words, ";"]:
        if word in OPERATORS:
            if command:
                yield command
            command = []
        else:
            command.append(word)


def examples_in(doc: str, block: list[tuple[int, str]]) -> Iterator[Example]:
    """The command lines of a block, with the output shown after each and the heredoc files before it."""
    prompted = any(line.startswith("$ ") for _, line in block)
    files: dict[str, str] = {}
    last: Example | None = None
    lines = iter(block)
    for number, line in lines:
        if prompted and not line.startswith("$ "):
            if last is not None:
                last.output.append(line.rstrip())
            continue
        text = line.removeprefix("$ ")
        while text.rstrip().endswith("\\") and not text.lstrip().startswith("#"):
            text = text.rstrip()[:-1] + " " + next(lines)[1]
        if heredoc := HEREDOC.search(text):
            body = []
            for _, body_line in lines:
                if body_line.strip() == heredoc.group(1):
                    break
                body.append(body_line)
            if target := HEREDOC_TARGET.search(text[: heredoc.start()]):
                files[target.group(1)] = "\n".join(body) + "\n"
            continue
        last = None
        for words in commands(shlex.split(text, comments=True)):
            if console_command(words) or runs_a_launcher(words):
                last = Example(doc, number, words, files=dict(files))
                yield last


def readme_examples() -> list[Example]:
    found = []
    for doc in DOCS:
        if (ROOT / doc).is_file():
            for block in fenced_blocks((ROOT / doc).read_text()):
                found.extend(examples_in(doc, block))
    return found


EXAMPLES = readme_examples()


def launched_command(words: list[str], env: dict[str, str]) -> tuple[str, list[str]]:
    """The console script and arguments a ``launch/`` script runs (its ``--dry-run``; a sweep's first worker)."""
    rest = invoked(words)
    assignments = dict(word.split("=", 1) for word in words[: len(words) - len(rest)] if ASSIGNMENT.match(word))
    printed = subprocess.run(
        ["bash", str(ROOT / rest[0]), "--dry-run", *rest[1:]],
        env={**env, **assignments},
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout.splitlines()
    command = console_command(shlex.split(printed[0]))
    assert command is not None, f"{rest[0]} runs no lf-* command: {printed[0]}"
    return command


def as_typed(word: str, folder: Path) -> str:
    """``word`` as a user types it in ``folder``: placeholders filled in, ``$PWD`` expanded."""
    word = PLACEHOLDER.sub(lambda match: match.group(1).replace(" ", "_"), word)
    return word.replace("${PWD}", str(folder)).replace("$PWD", str(folder))


def hydra_arguments(args: list[str]) -> tuple[list[str], bool, str | None]:
    """The overrides of a command's arguments, whether it is a multirun, and the ``--config-name`` given."""
    overrides, multirun, config_name = [], False, None
    words = iter(args)
    for word in words:
        if word in HYDRA_SWITCHES or word == "...":
            continue
        if word in MULTIRUN:
            multirun = True
        elif word in CONFIG_NAME_FLAGS:
            config_name = next(words)
        elif word in HYDRA_FLAGS_WITH_VALUE:
            next(words)
        elif word in INFO_FLAGS:
            topic = next(words, None)
            if topic is not None and topic not in INFO_TOPICS:
                overrides.append(topic)
        elif word.startswith("-"):
            raise AssertionError(f"{word}: a flag this test does not know (Hydra's --config-dir? teach it)")
        else:
            overrides.append(word)
    return overrides, multirun, config_name


def first_job(overrides: list[str]) -> list[str]:
    """A multirun's overrides with each sweep at its first value (an interval at its lower bound)."""
    parser = OverridesParser.create(config_loader=GlobalHydra.instance().config_loader())
    return [first_value(override) for override in parser.parse_overrides(overrides)]


def first_value(override: Override) -> str:
    if not override.is_sweep_override():
        assert override.input_line is not None
        return override.input_line
    interval = override.value()
    if isinstance(interval, IntervalSweep):
        value = Transformer.str(interval.start)
    else:
        value = next(override.sweep_string_iterator())
    return f"{override.get_key_element()}={value}"


def composing_error(config_name: str, module: str, overrides: list[str]) -> list[str] | None:
    """The lines the command prints when composing fails (``None`` when it composes)."""
    try:
        compose_config(config_name, overrides)
    except Exception as error:
        doc = CommandDoc.of_module(module)
        context = ErrorContext(doc, overrides, lambda changed: compose_config(config_name, changed))
        plain = explain(error, context)
        assert plain is not None, f"not an expected mistake: {error!r}"
        return plain.lines(doc.command)
    return None


@pytest.fixture
def hydra_app() -> Iterator[None]:
    GlobalHydra.instance().clear()
    with initialize_config_module(CONF_MODULE, version_base=VERSION_BASE):
        yield


def test_readme_shows_every_command():
    assert len(EXAMPLES) >= MIN_COMMAND_LINES, f"found only {len(EXAMPLES)} command lines: is the parser broken?"
    assert set(SCRIPTS) <= {example.program for example in EXAMPLES}, (
        "a console script without an example in README or docs/"
    )
    shown = {example.text for example in EXAMPLES}
    assert set(FAILS_AFTER_COMPOSING) <= shown, "an entry of FAILS_AFTER_COMPOSING that no page shows any more"


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda example: example.id)
def test_readme_command_composes(example: Example, hydra_app: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(FULL_ERROR_ENV, raising=False)
    for path, text in example.files.items():
        (tmp_path / path.lstrip("/")).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path.lstrip("/")).write_text(text)
    words = [as_typed(word, tmp_path) for word in example.words]
    script, args = console_command(words) or launched_command(words, dict(os.environ))
    argv = [script, *args]
    take_debug_switch(argv)
    if script == "lf-train":  # its setup reads plan=true as plan.enabled=true (plan is a group of keys)
        argv[1:] = plan_switch(argv[1:])
    overrides, multirun, config_name = hydra_arguments(argv[1:])
    config_name = config_name or CONFIG_NAMES[script]
    if multirun:
        overrides = first_job(overrides)
    error = composing_error(config_name, SCRIPTS[script], overrides)
    if not example.shown_error:
        assert error is None, "\n".join(error or [])
    elif example.text in FAILS_AFTER_COMPOSING:
        assert error is None, f"{example.doc} shows a refusal by the command, but composing fails: {error}"
    else:
        assert error == [line for line in example.output if line], f"{example.doc} shows another error"
