"""pyproject.toml lists every package (the list is explicit because conf/ installs as latentforge_conf)."""

from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parents[2]


def test_every_package_folder_is_listed():
    settings = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    folders = {
        ".".join(init.parent.relative_to(ROOT).parts)
        for top in ("trainer", "data_pipelines", "lf_common", "hydra_plugins")
        for init in (ROOT / top).rglob("__init__.py")
    }
    assert folders | {"latentforge_conf"} == set(settings["packages"])
    assert settings["package-dir"] == {"latentforge_conf": "conf"}
    assert (ROOT / "conf" / "__init__.py").is_file()
