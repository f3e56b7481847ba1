"""Every private upstream name the adapters of ``lf_common.upstream`` rely on still exists, with the
signature they call it with, in the installed versions.

A failure is one line: the upstream and the version seen, what changed, and the adapter to update.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import inspect
import os
import pkgutil
import re
from types import ModuleType

import pytest
from torch.utils.data import DataLoader, IterableDataset

import lf_common.upstream
from lf_common.upstream.contract import PrivateName
from lf_common.upstream.torch_private import restart_workers

HELPERS = {"contract"}  # modules of the package that are not adapters


BESIDE_THEIR_USER = ("trainer.callbacks.optuna_private",)  # adapters outside lf_common.upstream


def adapters() -> list[ModuleType]:
    names = [info.name for info in pkgutil.iter_modules(lf_common.upstream.__path__) if info.name not in HELPERS]
    return [importlib.import_module(f"lf_common.upstream.{name}") for name in sorted(names)] + [
        importlib.import_module(name) for name in BESIDE_THEIR_USER
    ]


CONTRACTS = [contract for module in adapters() for contract in getattr(module, "CONTRACTS", ())]


def test_every_adapter_lists_its_private_names():
    for module in adapters():
        assert module.__name__.endswith("_private"), f"{module.__name__}: adapters are named <upstream>_private"
        assert getattr(module, "CONTRACTS", None), f"{module.__name__}: no CONTRACTS (the private names it uses)"
        assert all(c.adapter == module.__name__.replace(".", "/") + ".py" for c in module.CONTRACTS), module.__name__


@pytest.mark.parametrize("contract", CONTRACTS, ids=lambda c: ".".join(c.subject.split(".")[-2:]))
def test_private_upstream_name_still_holds(contract: PrivateName):
    problem = contract.problem()
    if problem is not None:
        pytest.fail(contract.message(problem), pytrace=False)


def test_names_the_adapters_add_are_not_upstream_names():
    """A hooks class gives upstream's private steps names of ours; one that upstream also uses (a method, or an
    attribute its code sets) would be overwritten or called by upstream in its own sense."""
    clashes = []
    for module in adapters():
        for cls in vars(module).values():
            if not inspect.isclass(cls) or cls.__module__ != module.__name__ or cls.__bases__ == (object,):
                continue
            upstream = [base for base in cls.__mro__[1:] if base is not object]
            sources = "\n".join(inspect.getsource(base) for base in upstream)
            for name in (n for n in vars(cls) if not n.startswith("_")):
                assigned = re.search(rf"self\.{name}\b\s*(:[^=\n]*)?=", sources)  # an instance attribute
                if assigned or any(hasattr(base, name) for base in upstream):
                    clashes.append(f"{cls.__name__}.{name}")
    assert not clashes, f"adapter names that upstream also uses (rename them): {clashes}"


def test_a_changed_name_fails_with_one_line_naming_upstream_version_and_adapter():
    owner = "lightning.pytorch.callbacks.ModelCheckpoint"
    renamed = PrivateName("lightning", owner, "_save_ckpt", "x/adapter.py")
    resigned = PrivateName("lightning", owner, "_save_checkpoint", "x/a.py", parameters=("self", "trainer", "path"))
    assert renamed.problem() == "is gone"
    assert resigned.problem().startswith("takes ('self', 'trainer', 'filepath'), the adapter expects")
    message = renamed.message("is gone")
    assert "\n" not in message
    assert message.startswith(f"lightning {importlib.metadata.version('lightning')}: ")
    assert "ModelCheckpoint._save_ckpt is gone; update x/adapter.py" in message
    missing = PrivateName("hydra-optuna-sweeper", "hydra_plugins.hydra_optuna_sweeper._gone", "f", "x/adapter.py")
    assert missing.problem().startswith("cannot import hydra_plugins.hydra_optuna_sweeper._gone")


class WorkerPid(IterableDataset):
    """One item: the id of the process that iterates it."""

    def __iter__(self):
        yield os.getpid()


def test_restart_workers_gives_a_persistent_loader_new_workers():
    """The behaviour ``ResumableLoader`` relies on: persistent workers live on until restarted."""
    loader = DataLoader(WorkerPid(), batch_size=None, num_workers=1, persistent_workers=True)
    first = list(loader)
    assert list(loader) == first != [os.getpid()], "one worker process, kept between epochs"
    restart_workers(loader)
    assert list(loader) != first, "a new worker process after the restart"
    restart_workers(loader)
    single_process = DataLoader(WorkerPid(), batch_size=None)
    restart_workers(single_process)  # nothing to end
    assert list(single_process) == [os.getpid()]


class _Strategy:
    """A strategy's broadcast: records what it was asked, answers rank 0's value."""

    def __init__(self) -> None:
        self.asked: list[object] = []

    def broadcast(self, obj: object, src: int = 0) -> object:
        self.asked.append(obj)
        return "rank-0-value"


def test_own_path_broadcast_keeps_each_ranks_path_and_passes_the_rest():
    from pathlib import Path

    from lf_common.upstream.lightning_private import own_path_broadcast

    strategy = _Strategy()
    with own_path_broadcast(strategy, "/node1/run/checkpoint-staging/last.ckpt"):
        assert (
            strategy.broadcast("/node1/run/checkpoint-staging/last.ckpt") == "/node1/run/checkpoint-staging/last.ckpt"
        )
        assert strategy.broadcast(Path("/node1/run/checkpoint-staging/last.ckpt")) == Path(
            "/node1/run/checkpoint-staging/last.ckpt"
        )
        assert strategy.broadcast("another value") == "rank-0-value"
    assert strategy.asked == ["another value"], "the path is not broadcast, anything else is"
    assert "broadcast" not in vars(strategy) and strategy.broadcast("x") == "rank-0-value"


def test_lightning_still_broadcasts_rank_0s_checkpoint_path():
    """What :func:`own_path_broadcast` undoes: Lightning's DeepSpeed save and FSDP load take rank 0's path."""
    from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy

    assert "self.broadcast(filepath)" in inspect.getsource(DeepSpeedStrategy.save_checkpoint)
    assert "self.broadcast(checkpoint_path)" in inspect.getsource(FSDPStrategy.load_checkpoint)
