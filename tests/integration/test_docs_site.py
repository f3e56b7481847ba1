"""The documentation site (mkdocs.yml, docs/) builds with ``mkdocs build --strict``, as CI builds it: a broken
link or anchor, a page left out of the nav, a docstring mkdocstrings cannot render, or any other warning fails.
The API pages are generated from the package folders at build time (docs/gen_api_pages.py); each must show the
objects of its package."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("trainer", "data_pipelines", "lf_common")
OBJECT_HEADING = re.compile(r'class="doc doc-heading"')


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The site, built strictly into a fresh folder (the build's output in the failure message)."""
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1", "DISABLE_MKDOCS_2_WARNING": "true"}
    built = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet", "-f", str(ROOT / "mkdocs.yml"), "-d", out],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert built.returncode == 0, f"mkdocs build --strict failed:\n{built.stdout}\n{built.stderr}"
    return out


@pytest.mark.slow
def test_every_topic_page_is_built(site: Path):
    pages = {path.stem for path in (ROOT / "docs").glob("*.md")}
    assert pages, "no page in docs/"
    for page in pages:
        built = site / ("index.html" if page == "index" else f"{page}/index.html")
        assert built.is_file(), f"docs/{page}.md was not built"
        assert "```" not in built.read_text(), f"docs/{page}.md: a code fence left as raw markdown"


@pytest.mark.slow
def test_every_package_has_an_api_page_with_its_objects(site: Path):
    packages = sorted(init.parent.relative_to(ROOT) for top in PACKAGES for init in (ROOT / top).rglob("__init__.py"))
    for package in packages:
        page = site / "api" / package / "index.html"
        assert page.is_file(), f"no API page for {'.'.join(package.parts)}"
        modules = [path for path in (ROOT / package).glob("*.py") if path.name != "__init__.py"]
        headings = len(OBJECT_HEADING.findall(page.read_text()))
        assert headings >= 1 + len(modules), f"{page}: {headings} objects shown for {len(modules)} modules"
