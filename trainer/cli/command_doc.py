"""What a command's module docstring says about it: the one place its description, examples and
main keys are written, read by ``--help`` (:mod:`trainer.cli.help`) and by the error messages that
show an example (:mod:`trainer.cli.errors`).

A command module's docstring has this shape::

    ``lf-train``: train the UNet on latent shards.      <- first paragraph: what it does

    Examples::

        lf-train data.train_dir=latents/ trainer.max_steps=2000    # a comment is kept

    Keys::

        data.train_dir      folder of latent shards (lf-precompute's out_dir)
        trainer.max_steps   optimizer steps to train

Example lines ending in a backslash continue on the next line. Key lines hold the dotted key, two
or more spaces, and what it is.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field
from importlib import import_module

_BLOCK = re.compile(r"^(\w[\w ]*)::\s*$")
_KEY_LINE = re.compile(r"^(\S+)\s{2,}(.+)$")


@dataclass(frozen=True)
class CommandDoc:
    """A command's docstring, read.

    Attributes:
        command: the console script, e.g. ``lf-train`` (from the ``lf-...`` that opens the docstring).
        description: the first paragraph, one line, without reST markup.
        examples: the example command lines, continuation lines joined.
        keys: ``(dotted key, what it is)`` for the keys that matter most.
    """

    command: str
    description: str
    examples: list[str] = field(default_factory=list)
    keys: list[tuple[str, str]] = field(default_factory=list)

    @classmethod
    def of_module(cls, module_name: str) -> CommandDoc:
        """The doc of a command module (``__main__`` under ``python -m``)."""
        module = sys.modules.get(module_name) or import_module(module_name)
        return cls.parse(module.__doc__ or "", fallback_command=module_name.rpartition(".")[2])

    @classmethod
    def parse(cls, text: str, fallback_command: str = "command") -> CommandDoc:
        """Read ``text`` (a module docstring of the shape above)."""
        paragraphs = text.strip().split("\n\n")
        first = " ".join(line.strip() for line in paragraphs[0].splitlines()) if paragraphs else ""
        first = first.replace("``", "")
        command, _, description = first.partition(": ")
        if not command.startswith("lf-") or " " in command:
            command, description = fallback_command, first
        blocks = _blocks(text)
        return cls(
            command=command,
            description=description.strip(),
            examples=_joined(blocks.get("Examples", [])),
            keys=[(m.group(1), m.group(2).strip()) for m in map(_KEY_LINE.match, blocks.get("Keys", [])) if m],
        )

    def example_with(self, key: str) -> str | None:
        """The first example that sets ``key`` (``key=...`` on its command line), or ``None``."""
        pattern = re.compile(rf"(^|\s|['\"])\+*{re.escape(key)}=")
        return next((example for example in self.examples if pattern.search(example.split("  #")[0])), None)

    def key_help(self, key: str) -> str | None:
        """What ``key`` is, from the Keys block, or ``None``."""
        return next((what for name, what in self.keys if name == key), None)


def _blocks(text: str) -> dict[str, list[str]]:
    """The indented lines under each ``Name::`` line, dedented, blank lines dropped."""
    blocks: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in text.splitlines():
        indented = line.startswith(" ")
        match = None if indented else _BLOCK.match(line.strip())
        if match:
            current = blocks.setdefault(match.group(1), [])
        elif current is not None and indented:
            current.append(line.strip())
        elif line.strip():
            current = None
    return blocks


def _joined(lines: list[str]) -> list[str]:
    """Lines with a trailing backslash joined to the next one."""
    joined: list[str] = []
    pending = ""
    for line in lines:
        if line.endswith("\\"):
            pending += line[:-1].rstrip() + " "
            continue
        joined.append(pending + line)
        pending = ""
    if pending:
        joined.append(pending.rstrip())
    return joined
