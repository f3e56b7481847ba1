"""The import graph of the packages follows the layers of ``../shared/DESIGN.md``: every import points
down (or within its own package), and no modules import each other in a circle.

Function-level imports count too: a lazy import is still an arrow.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("trainer", "data_pipelines", "lf_common")

# Higher imports lower; equal ranks may import each other only within one package.
LAYERS: dict[str, int] = {
    "trainer": 100,  # the package itself
    "trainer.cli": 90,
    "trainer.sweeps": 85,
    "trainer.callbacks": 80,
    "trainer.modules": 70,
    "trainer.dreambooth": 70,
    "trainer.textual_inversion": 65,  # new tokens, their prompts and captioned latent batches (below modules)
    "trainer.sampling": 60,
    "trainer.evaluation": 55,
    "trainer.strategies": 55,  # with the Lightning and DeepSpeed adapters they use (lightning_private, ...)
    "trainer.faults": 52,  # preemption signals, the phase board and hang watchdog (below callbacks, above checkpoint)
    "trainer.checkpoint": 50,  # our own training checkpoints (keys, reading, resume, remote, export)
    "trainer.interop": 48,  # every foreign format (SD single files, layouts, pickles, LoRA/LyCORIS files)
    "trainer.memory": 46,  # the memory plan: arithmetic on parameter shapes, the meta-device activation estimate
    "trainer.lora": 45,
    "trainer.diffusion": 40,
    "trainer.tiny_models": 40,
    "data_pipelines.loading": 30,
    "data_pipelines.latents": 28,
    "data_pipelines.raw": 26,
    "data_pipelines.transforms": 26,
    "data_pipelines.shards": 24,
    "data_pipelines": 20,  # the package itself (assets)
    "lf_common": 10,  # the neutral base: the standard library and fsspec only (test below)
}

# Every adapter over a private upstream API lives beside its user, in that user's layer: none in lf_common.
# What lf_common may import besides the standard library and itself: fsspec (the storage interface) and
# botocore, the S3 client under fsspec's s3fs, whose error types lf_common.object_store names (an import
# guarded by ImportError, so it is optional).
NEUTRAL_THIRD_PARTY = {"fsspec", "botocore"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> tuple[str, int]:
    """The longest layer prefix of ``module`` and its rank."""
    matches = [name for name in LAYERS if module == name or module.startswith(name + ".")]
    assert matches, f"{module}: in no layer of tests/unit/test_layers.py (add its package there)"
    name = max(matches, key=len)
    return name, LAYERS[name]


def imports(path: Path) -> set[str]:
    """Every module (and ``module.name`` for ``from module import name``) ``path`` imports, at any depth of the
    file; a relative import as ``.`` plus its module."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level > 0:
            found.add("." + (node.module or ""))
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return found


def project_imports(path: Path) -> set[str]:
    """The project modules ``path`` imports, at any depth of the file."""
    found = imports(path)
    modules = {module_name(p) for package in PACKAGES for p in (ROOT / package).rglob("*.py")}
    return {name for name in found if name in modules and name.split(".")[0] in PACKAGES}


def import_graph() -> dict[str, set[str]]:
    return {
        module_name(path): project_imports(path) - {module_name(path)}
        for package in PACKAGES
        for path in sorted((ROOT / package).rglob("*.py"))
    }


def test_every_import_points_down_the_layers():
    upward = []
    for module, imports in import_graph().items():
        layer, rank = layer_of(module)
        for imported in imports:
            other, other_rank = layer_of(imported)
            if other_rank > rank or (other_rank == rank and other != layer):
                upward.append(f"{module} ({layer}) -> {imported} ({other})")
    assert not upward, "imports that run up or across the layers:\n" + "\n".join(sorted(upward))


def test_no_circular_imports():
    graph = import_graph()
    visiting, done, cycles = set(), set(), []

    def visit(module: str, trail: list[str]) -> None:
        if module in done:
            return
        if module in visiting:
            cycles.append(" -> ".join([*trail[trail.index(module) :], module]))
            return
        visiting.add(module)
        for imported in sorted(graph.get(module, ())):
            if imported in graph:
                visit(imported, [*trail, module])
        visiting.discard(module)
        done.add(module)

    for module in sorted(graph):
        visit(module, [])
    assert not cycles, "circular imports:\n" + "\n".join(cycles)


def test_checkpoint_layer_imports_no_lightning_module_or_callback():
    """The sampler and export read checkpoints without the training code (DESIGN: checkpoint below Lightning)."""
    for module, imports in import_graph().items():
        if module.startswith(("trainer.checkpoint", "trainer.sampling")):
            assert not {i for i in imports if i.startswith(("trainer.modules", "trainer.callbacks"))}, module


def test_lf_common_imports_only_the_standard_library_and_fsspec():
    """The bottom layer is neutral: no torch, Lightning, DeepSpeed, transformers, Optuna, ... (DESIGN: lf_common)."""
    allowed = set(sys.stdlib_module_names) | NEUTRAL_THIRD_PARTY | {"lf_common", "__future__"}
    checked, framework = 0, []
    for path in sorted((ROOT / "lf_common").rglob("*.py")):
        checked += 1
        for name in imports(path):
            top = name.split(".")[0]
            if top not in allowed:  # a relative import ("." + module) is refused too: name the module absolutely
                framework.append(f"{path.relative_to(ROOT)} imports {name}")
    assert checked > 5, f"only {checked} modules of lf_common checked: is the walk above right?"
    assert not framework, "lf_common imports beyond the standard library and fsspec:\n" + "\n".join(sorted(framework))


def test_imports_are_found_at_any_depth(tmp_path: Path):
    """What the neutrality test relies on: a lazy import inside a function is found, as a top-level one is."""
    module = tmp_path / "lazy.py"
    module.write_text("import os\n\ndef f():\n    from lightning.pytorch import Trainer\n    import torch.nn\n")
    assert imports(module) == {"os", "lightning.pytorch", "lightning.pytorch.Trainer", "torch.nn"}
