"""Write the API reference pages at build time (mkdocs-gen-files), one page per Python package.

The packages are found by walking the source folders, so a module or package moved, added or
removed changes the pages with no list to keep: each page renders the package's docstring and
every module directly inside it (mkdocstrings reads the source statically with griffe; nothing
is imported). ``api/SUMMARY.md`` is the navigation literate-nav reads.
"""

from __future__ import annotations

from pathlib import Path

import mkdocs_gen_files

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("trainer", "data_pipelines", "lf_common")
"""The top-level packages documented (``conf/`` holds configs, not code)."""


def packages_under(top: Path) -> list[Path]:
    """Every package folder (one with ``__init__.py``) under ``top``, ``top`` included, sorted."""
    return sorted(init.parent for init in top.rglob("__init__.py") if "__pycache__" not in init.parts)


def page_text(package: Path) -> str:
    """The page of one package: its docstring (its members are shown in their modules), then each module
    directly inside it."""
    dotted = ".".join(package.relative_to(ROOT).parts)
    lines = [f"::: {dotted}", "    options:", "      heading_level: 1", "      members: false", ""]
    for module in sorted(package.glob("*.py")):
        if module.name != "__init__.py":
            lines += [f"::: {dotted}.{module.stem}", "    options:", "      heading_level: 2", ""]
    return "\n".join(lines)


nav = mkdocs_gen_files.Nav()
for top in PACKAGES:
    for package in packages_under(ROOT / top):
        parts = package.relative_to(ROOT).parts
        path = Path("api", *parts, "index.md")
        nav[parts] = Path(*parts, "index.md").as_posix()
        with mkdocs_gen_files.open(path, "w") as page:
            page.write(page_text(package))
        mkdocs_gen_files.set_edit_path(path, (package / "__init__.py").relative_to(ROOT))

with mkdocs_gen_files.open("api/SUMMARY.md", "w") as summary:
    summary.writelines(nav.build_literate_nav())
