"""README stays short and every topic page is on the site: README within 200 lines of at most 120 characters,
naming every console script with a link to its page; every page of docs/ in mkdocs.yml's nav; no dated
measurement in README or docs/ (dated timings belong in BENCHMARKS.md, with their machine)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parents[2]
README_MAX_LINES = 200
LINE_LENGTH = 120
DATE = re.compile(r"(?<![\w-])20\d\d-\d\d-\d\d(?![\w-])")
"""A date as BENCHMARKS.md writes it (``2026-11-27``), not inside a file name (``pt_inception-2015-12-05-...``)."""
COMMAND_ROW = re.compile(r"^\| `(lf-[\w-]+)` \|.*\]\((docs/[\w-]+\.md)[)#]", re.MULTILINE)


def pages() -> list[Path]:
    return sorted((ROOT / "docs").glob("**/*.md"))


def nav_pages(entries: list) -> set[str]:
    """The Markdown files named in a mkdocs nav (nested sections included)."""
    found = set()
    for entry in entries:
        for value in entry.values() if isinstance(entry, dict) else [entry]:
            if isinstance(value, list):
                found |= nav_pages(value)
            elif isinstance(value, str) and value.endswith(".md"):
                found.add(value)
    return found


def test_readme_is_short():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines: move the reference into docs/"
    long = [number for number, line in enumerate(lines, start=1) if len(line) > LINE_LENGTH]
    assert not long, f"README.md lines longer than {LINE_LENGTH} characters: {long}"


def test_readme_links_every_command_to_its_page():
    scripts = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"])
    rows = dict(COMMAND_ROW.findall((ROOT / "README.md").read_text()))
    assert set(rows) == scripts, "README's table of commands and pyproject.toml's console scripts differ"
    for script, page in rows.items():
        assert (ROOT / page).is_file(), f"README links {script} to {page}, which does not exist"


def test_every_page_is_in_the_nav():
    config = yaml.load((ROOT / "mkdocs.yml").read_text(), Loader=yaml.BaseLoader)
    listed = nav_pages(config["nav"])
    on_disk = {page.relative_to(ROOT / "docs").as_posix() for page in pages()}
    assert on_disk == listed, (
        f"pages not in mkdocs.yml's nav: {sorted(on_disk - listed)}; missing: {sorted(listed - on_disk)}"
    )


def test_no_dated_measurement_outside_benchmarks():
    for doc in [ROOT / "README.md", *pages()]:
        for number, line in enumerate(doc.read_text().splitlines(), start=1):
            assert not DATE.search(line), f"{doc.relative_to(ROOT)}:{number}: a dated result: BENCHMARKS.md holds those"
