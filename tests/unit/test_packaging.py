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


def test_nothing_latentforge_installs_holds_optuna_or_sqlalchemy_back():
    """``pip install latentforge`` beside Optuna 4 or 5 and SQLAlchemy 2 (issue 30: hydra-optuna-sweeper pinned
    optuna<3 and sqlalchemy<2). Walks the requirements of latentforge and of everything it pulls in, as installed
    here; a fresh venv's resolution with pip is in the issue's note (it downloads the whole stack)."""
    from importlib.metadata import PackageNotFoundError, distribution

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    current = {"optuna": ("4.0.0", "4.9.0", "5.1.0"), "sqlalchemy": ("2.0.0", "2.1.9")}
    asked: dict[str, list[str]] = {}
    seen: set[str] = set()
    queue = ["latentforge"]
    while queue:
        name = queue.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            requirements = [Requirement(text) for text in distribution(name).requires or []]
        except PackageNotFoundError:  # an optional dependency that is not installed
            continue
        for requirement in requirements:
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                key = canonicalize_name(requirement.name)
                queue.append(key)
                if key in current:
                    asked.setdefault(key, []).append(f"{name} wants {requirement}")
    assert set(asked) == set(current), asked  # optuna, and SQLAlchemy through it
    refused = [
        f"{why}: refuses {key} {version}"
        for key, whys in asked.items()
        for why in whys
        for version in current[key]
        if not Requirement(why.split(" wants ")[1]).specifier.contains(version)
    ]
    assert not refused, refused
