"""data=mixed: every folder agrees with the first on the tokenizer(s) and the text encoding recipe too (refused in
one line naming both folders and the field), and the run's provenance records every folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from data_pipelines.latents.format.keys import MANIFEST_NAME
from data_pipelines.loading.datamodules import LatentShardDataModule
from data_pipelines.loading.mixed import MixedLatentDataModule
from lf_common.errors import DataError
from tests.unit.test_mixed_datasets import LOADER, copy_of
from trainer.callbacks.provenance import training_datasets


def edited(latent_dir: Path, out: Path, edit) -> Path:
    """A copy of ``latent_dir`` whose manifest ``edit(manifest)`` changed (in place)."""
    folder = copy_of(latent_dir, out)
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    edit(manifest)
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest))
    return folder


def other_tokenizer(manifest: dict) -> None:
    manifest["tokenizer_path"] = "/models/other/tokenizer"
    for shard in manifest["shards"]:
        shard["cache_key"]["tokenizer"] = "e" * 64


def clip_skip_2(manifest: dict) -> None:
    manifest["text_encoder"]["extra"]["clip_skip"] = 2


def test_another_tokenizer_or_text_encoding_is_refused_naming_both_folders(latent_dir, tmp_path):
    cases = {
        "tokenizer": (other_tokenizer, r"tokenizer differs .*/models/other/tokenizer \(eeeeeeeeeeee\) vs "),
        "text_encoding": (
            clip_skip_2,
            r"text_encoding differs .*'clip_skip': 2\} vs \{.*'clip_skip': 1\}.* clip_skip=1",
        ),
    }
    for name, (edit, differs) in cases.items():
        other = edited(latent_dir, tmp_path / name, edit)
        with pytest.raises(DataError, match=differs) as refused:
            MixedLatentDataModule([{"path": str(latent_dir)}, {"path": str(other)}], **LOADER)
        message = str(refused.value)
        assert "\n" not in message and f"({other})" in message and f"data.datasets[0] ({latent_dir})" in message


def test_provenance_records_every_folder_with_its_entry(latent_dir, tmp_path):
    reg = copy_of(latent_dir, tmp_path / "reg", shards=1)  # 32 of the 96 samples
    data = MixedLatentDataModule(
        [{"path": str(latent_dir), "repeats": 2, "name": "subject"}, {"path": str(reg), "is_reg": True}], **LOADER
    )
    subject, regularization = training_datasets(data)
    assert (subject["path"], subject["name"], subject["repeats"], subject["num_samples"]) == (
        str(latent_dir), "subject", 2, 96
    )  # fmt: skip
    assert (regularization["path"], regularization["name"], regularization["is_reg"]) == (str(reg), "reg", True)
    assert regularization["num_samples"] == 32 and subject["probability"] == pytest.approx(192 / 224)
    json.dumps(training_datasets(data))  # plain values: the checkpoint and latentforge.json hold them
    (single,) = training_datasets(LatentShardDataModule(str(reg), **LOADER))  # data=latents: its one folder
    assert single == {"path": str(reg), "name": "reg", "num_samples": 32, "resolution": 32}
