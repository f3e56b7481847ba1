"""What an adapter over a private upstream API relies on in its upstream, and the check that it still holds.

The adapters live beside their one user, each named ``<upstream>_private.py`` (every private upstream name
the project uses goes through one; its docstring says what for and why no public API does it). Each
adapter module lists its private upstream names in ``CONTRACTS``;
``tests/unit/test_upstream_contracts.py`` checks every entry against the installed versions, so an
upgrade that renames, removes or re-signs one fails there, with one line naming the upstream, its
version and the adapter to update, instead of failing (or, for an override, silently no longer
being called) somewhere in a training run.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

Kind = Literal["callable", "attribute", "source"]


@dataclass(frozen=True)
class PrivateName:
    """One private name of an upstream library that an adapter uses or overrides.

    Attributes:
        upstream: the distribution it comes from, as pip names it (its installed version goes in the message).
        owner: import path of the module, class or function holding it, e.g.
            ``lightning.pytorch.callbacks.ModelCheckpoint``.
        name: the attribute, e.g. ``_save_checkpoint``; for ``kind="source"``, text the owner's source must contain.
        kind: ``"callable"``: a function or method (``parameters`` are checked when given); ``"attribute"``:
            an attribute of the owner, or of the instance that ``instance`` builds (one set in ``__init__``);
            ``"source"``: the owner's source contains ``name`` (an attribute assigned outside ``__init__``).
        parameters: a callable's parameter names in order, ``self`` included (``None``: not checked, as for
            builtins, whose signature cannot be read).
        instance: builds an instance of the owner cheaply, for an attribute that instances get.
        adapter: the adapter module that relies on it (the one to update).
    """

    upstream: str
    owner: str
    name: str
    adapter: str
    kind: Kind = "callable"
    parameters: tuple[str, ...] | None = None
    instance: Callable[[], Any] | None = None

    def problem(self) -> str | None:
        """What no longer holds in the installed upstream, in a few words; ``None`` when it all holds."""
        try:
            owner = resolve(self.owner)
        except (ImportError, AttributeError) as error:
            return f"cannot import {self.owner} ({error})"
        if self.kind == "source":
            return None if self.name in inspect.getsource(owner) else f"no longer contains `{self.name}`"
        holder = self.instance() if self.kind == "attribute" and self.instance is not None else owner
        if not hasattr(holder, self.name):
            return "is gone"
        if self.kind != "callable":
            return None
        found = getattr(holder, self.name)
        if not callable(found):
            return "is no longer callable"
        if self.parameters is None:
            return None
        seen = tuple(inspect.signature(found).parameters)
        return None if seen == self.parameters else f"takes {seen}, the adapter expects {self.parameters}"

    @property
    def subject(self) -> str:
        """What is relied on, e.g. ``lightning.pytorch.callbacks.ModelCheckpoint._save_checkpoint``."""
        return self.owner if self.kind == "source" else f"{self.owner}.{self.name}"

    def message(self, problem: str) -> str:
        """The one-line report of ``problem``: upstream, version seen, what changed and what to update."""
        return (
            f"{self.upstream} {installed_version(self.upstream)}: {self.subject} {problem}; "
            f"update {self.adapter} (and its CONTRACTS) to this version, or pin {self.upstream} to one where it holds"
        )


def resolve(dotted: str) -> Any:
    """The object at ``dotted``: the longest importable module prefix, then attributes (classes, methods)."""
    parts = dotted.split(".")
    for split in range(len(parts), 0, -1):
        try:
            found = importlib.import_module(".".join(parts[:split]))
        except ModuleNotFoundError:
            continue
        for attribute in parts[split:]:
            found = getattr(found, attribute)
        return found
    raise ImportError(f"no module in {dotted}")


def installed_version(distribution: str) -> str:
    """The installed version of ``distribution`` (``"not installed"`` when it is not)."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"
