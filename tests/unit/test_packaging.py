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


def test_every_config_file_ships():
    """Each file under conf/ matches a package-data pattern (setuptools' globs: ``*`` stops at a ``/``), so an
    installed latentforge composes the same configs as a checkout (conf/hydra/sweeper/sampler/ is four deep)."""
    from fnmatch import fnmatchcase

    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    patterns = [pattern.split("/") for pattern in patterns["latentforge_conf"]]
    files = [p.relative_to(ROOT / "conf").parts for p in (ROOT / "conf").rglob("*") if p.suffix in (".yaml", ".json")]
    assert ("hydra", "sweeper", "sampler", "tpe.yaml") in files
    missing = [
        "/".join(parts)
        for parts in files
        if not any(len(parts) == len(pattern) and all(map(fnmatchcase, parts, pattern)) for pattern in patterns)
    ]
    assert not missing, f"conf files that no package-data pattern of pyproject.toml ships: {missing}"
