"""One path for local and remote storage: only the storage package asks whether a path is a URL.

Code above it reads, lists, resolves and shows local paths and URLs through the path-agnostic functions of
:mod:`lf_common.object_store` and :mod:`lf_common.object_cache`; a writer that must stage (a store has no
rename) asks :func:`lf_common.object_store.is_store`.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("trainer", "data_pipelines", "lf_common")
STORAGE_PACKAGE = Path("lf_common/object_store")  # its modules: paths (where is_url is), reading, writing, ...
IS_URL_MODULE = STORAGE_PACKAGE / "paths.py"
_CALL = re.compile(r"\bis_url\(")


def test_only_the_storage_module_asks_whether_a_path_is_a_url():
    files = [path for package in PACKAGES for path in sorted((ROOT / package).rglob("*.py"))]
    assert len(files) > 50 and ROOT / IS_URL_MODULE in files, "the packages were found"
    callers = {
        f"{path.relative_to(ROOT)}:{number}"
        for path in files
        if not path.relative_to(ROOT).is_relative_to(STORAGE_PACKAGE)
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if _CALL.search(line)
    }
    assert not callers, f"is_url( outside {STORAGE_PACKAGE}: use its path-agnostic functions instead: {sorted(callers)}"
    assert _CALL.search((ROOT / IS_URL_MODULE).read_text(encoding="utf-8")), "the pattern still finds the definition"
