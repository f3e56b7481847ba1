"""Fine-tuning follows the base model's prediction type: a v-prediction base trains as v unless the
user asks otherwise, and a contradicting objective is refused unless the change is allowed."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.conftest import compose_config, tiny_train_overrides
from trainer.checkpoint.reading import load_checkpoint
from trainer.cli.train import run_train

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def v_base(base_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny base export, with a scheduler that says v-prediction (as SD 2.x 768-v's does)."""
    folder = tmp_path_factory.mktemp("v_base") / "model"
    shutil.copytree(base_model, folder)
    config_file = folder / "scheduler" / "scheduler_config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "prediction_type": "v_prediction"}))
    return folder


def fine_tune(latent_dir: Path, base: Path, out: Path, *extra: str) -> str:
    """Two steps of ``lf-train model=pretrained``; the prediction type the checkpoint records."""
    overrides = [*tiny_train_overrides(latent_dir, out, steps=2), "model=pretrained", f"model.pretrained={base}"]
    run_train(compose_config("train", [*overrides, *extra]))
    checkpoint = load_checkpoint(out / "checkpoints" / "last.ckpt")
    return checkpoint["latentforge"]["noise_scheduler_config"]["prediction_type"]


def test_a_v_prediction_base_trains_as_v_by_default(latent_dir, v_base, tmp_path, caplog):
    with caplog.at_level("INFO"):
        assert fine_tune(latent_dir, v_base, tmp_path) == "v_prediction"
    assert "prediction_type=v_prediction" in caplog.text


def test_an_objective_that_contradicts_the_base_is_refused(latent_dir, v_base, tmp_path):
    with pytest.raises(Exception, match=r"the base model predicts v_prediction, but objective.prediction_type=epsilon"):
        fine_tune(latent_dir, v_base, tmp_path, "objective=eps")
    assert not (tmp_path / "checkpoints").exists()


def test_a_deliberate_conversion_is_allowed(latent_dir, v_base, tmp_path):
    assert fine_tune(latent_dir, v_base, tmp_path, "objective=eps", "objective.allow_prediction_type_change=true") == (
        "epsilon"
    )


def test_an_objective_that_agrees_with_the_base_trains(latent_dir, base_model, tmp_path):
    assert fine_tune(latent_dir, base_model, tmp_path, "objective=eps") == "epsilon"
