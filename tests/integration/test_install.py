"""``pip install .`` (not editable) into a fresh environment gives commands that work outside the
checkout: the configs ship inside the package, and a user's own config folder joins them through
Hydra's search path (``hydra.searchpath``), as docs/configs.md shows."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from tests.conftest import tiny_train_overrides

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
BUILD_LOG = "build.log"


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A new venv holding latentforge's wheel; its dependencies come from this environment's
    site-packages, appended after its own (plain path entries: this environment's editable-install
    hook is not loaded there)."""
    work = tmp_path_factory.mktemp("install")
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-v", "-w",
                            str(work / "dist"), str(ROOT)], check=True, capture_output=True, text=True)  # fmt: skip
    (work / BUILD_LOG).write_text(build.stdout + build.stderr)  # -v: the build backend's warnings included
    (wheel,) = (work / "dist").glob("latentforge-*.whl")
    venv = work / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = Path(sysconfig.get_path("purelib", vars={"base": str(venv), "platbase": str(venv)}))
    (site / "zz_dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "--no-deps",
                    "-q", str(wheel)], check=True, capture_output=True)  # fmt: skip
    return venv


def test_the_build_warns_of_nothing_deprecated(installed):
    log = (installed.parent / BUILD_LOG).read_text()
    assert "Preparing metadata" in log  # the backend's own output is there
    assert "deprecated" not in log.lower(), [line for line in log.splitlines() if "deprecated" in line.lower()]


def run_installed(venv: Path, command: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": "", "PATH": f"{venv / 'bin'}{os.pathsep}/usr/bin:/bin"}
    return subprocess.run([str(venv / "bin" / command), *args], cwd=cwd, env=env, capture_output=True, text=True)


def test_the_package_is_imported_from_the_install_not_the_checkout(installed, tmp_path):
    code = "import trainer, latentforge_conf; print(trainer.__file__); print(latentforge_conf.__file__)"
    result = run_installed(installed, "python", "-c", code, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert all(line.startswith(str(installed)) for line in result.stdout.split()), result.stdout


def test_installed_lf_train_trains_with_a_users_own_experiment(installed, latent_dir, tmp_path):
    mine = tmp_path / "my_configs" / "experiment"
    mine.mkdir(parents=True)
    (mine / "my_short_run.yaml").write_text("# @package _global_\ntrainer:\n  max_steps: 3\noptim:\n  lr: 0.0003\n")
    overrides = [o for o in tiny_train_overrides(latent_dir, tmp_path / "run") if not o.startswith("trainer.max_steps")]
    result = run_installed(installed, "lf-train", f"hydra.searchpath=[file://{tmp_path / 'my_configs'}]",
                           "experiment=my_short_run", *overrides, f"hydra.run.dir={tmp_path / 'hydra'}",
                           cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "training done at step 3" in (tmp_path / "hydra" / "train.log").read_text()
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()
    built_in = run_installed(installed, "lf-train", "--cfg", "job", "data.train_dir=x", "objective=v", cwd=tmp_path)
    assert built_in.returncode == 0 and "prediction_type: v_prediction" in built_in.stdout, built_in.stderr
