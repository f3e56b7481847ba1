"""Checkpoints in a bucket of a real S3 server (moto): an upload cut short by the store going away never
leaves a checkpoint that a resume takes as complete, and the same command run again completes; a
DeepSpeed checkpoint folder (its ``latest`` tag uploaded last) goes to the bucket and resumes from it
exactly (as an uninterrupted run with local checkpoints ends), and retention keeps the remote checkpoint it
resumed from; ``lf-train-autoencoder`` checkpoints to the bucket and resumes from it as from local disk.

The full path with every folder in the bucket (shards, latents, checkpoints, export, images) and the
exact resume from a remote ``last`` are in ``test_object_storage.py``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from lf_common import object_store
from lf_common.errors import DataError
from tests.conftest import autoencoder_overrides, compose_config, tiny_train_overrides
from tests.integration.checkpoints import assert_resume_is_exact, assert_same_nested
from tests.s3_server import server_down
from trainer.checkpoint.reading import load_checkpoint
from trainer.checkpoint.resume import resolve_resume_checkpoint
from trainer.cli.train import run_train
from trainer.cli.train_autoencoder import run_train_autoencoder

pytestmark = pytest.mark.slow


def names(prefix: str) -> set[str]:
    """The checkpoint names (files and folders) directly under ``prefix``."""
    return {object_store.basename(entry["url"]) for entry in object_store.list_entries(prefix)}


def fail_upload_when(monkeypatch: pytest.MonkeyPatch, server: str, cut: Callable[[str], bool]) -> Callable:
    """Stop the server as an upload starts whose URL ``cut`` picks; the others go through. Returns the real
    upload (to set back: ``monkeypatch.undo`` would also undo the test's AWS variables)."""
    real_upload = object_store.upload

    def upload(local, url):
        if not cut(url):
            return real_upload(local, url)
        with server_down(server):
            return real_upload(local, url)

    monkeypatch.setattr(object_store, "upload", upload)
    return real_upload


def test_an_upload_cut_short_keeps_the_previous_checkpoint_and_the_rerun_completes(
    latent_dir, s3_server, s3_bucket, tmp_path, monkeypatch
):
    checkpoints = f"{s3_bucket}/run/checkpoints"
    out = tmp_path / "run"
    overrides = [*tiny_train_overrides(latent_dir, out, steps=4), f"callbacks.model_checkpoint.dirpath={checkpoints}"]
    real_upload = fail_upload_when(monkeypatch, s3_server, lambda url: "step-0000004" in url)
    message = r"step-0000004\.ckpt at endpoint .*Could not connect.*the checkpoint saved before it stays complete"
    with pytest.raises(object_store.ObjectStoreError, match=message):
        run_train(compose_config("train", overrides))
    assert names(checkpoints) == {"step-0000002.ckpt", "last.ckpt"}  # nothing of step 4
    assert not list((out / "checkpoint-staging").iterdir()), "the staged copy is removed"
    resumable = resolve_resume_checkpoint("last", checkpoints, tmp_path / "cache")
    assert load_checkpoint(resumable)["global_step"] == 2
    named = resolve_resume_checkpoint(f"{checkpoints}/step-0000002.ckpt", None, tmp_path / "cache")
    assert load_checkpoint(named)["global_step"] == 2
    with pytest.raises(DataError, match=r"step-0000004\.ckpt: checkpoint does not exist"):
        resolve_resume_checkpoint(f"{checkpoints}/step-0000004.ckpt", None, tmp_path / "cache")

    monkeypatch.setattr(object_store, "upload", real_upload)
    assert run_train(compose_config("train", [*overrides, "auto_resume=true"]))["global_step"] == 4
    assert names(checkpoints) == {"step-0000002.ckpt", "step-0000004.ckpt", "last.ckpt"}


def test_deepspeed_folders_go_to_the_bucket_tag_last_and_resume_from_it(
    latent_dir, s3_server, s3_bucket, tmp_path, monkeypatch, caplog
):
    checkpoints = f"{s3_bucket}/run/checkpoints"
    ds = ["strategy=deepspeed_stage_2", "trainer.devices=1", "callbacks.model_checkpoint.every_n_train_steps=1"]
    overrides = [*tiny_train_overrides(latent_dir, tmp_path / "run", steps=2), *ds]
    overrides += [f"callbacks.model_checkpoint.dirpath={checkpoints}", "callbacks.model_checkpoint.save_top_k=1"]
    tags = []  # last.ckpt's tag at step 2 (its second save) never arrives

    def tag_count(url: str) -> bool:
        tags.append(url)
        return len(tags) == 2

    last_tag = lambda url: url.endswith("last.ckpt/latest") and tag_count(url)  # noqa: E731
    real_upload = fail_upload_when(monkeypatch, s3_server, last_tag)
    with pytest.raises(object_store.ObjectStoreError, match=r"last\.ckpt/latest at endpoint"):
        run_train(compose_config("train", overrides))
    step_2 = object_store.object_infos(f"{checkpoints}/step-0000002.ckpt")
    model, optimizer = "checkpoint/mp_rank_00_model_states.pt", "checkpoint/zero_pp_rank_0_mp_rank_00_optim_states.pt"
    assert {"latest", model, optimizer} <= set(step_2)
    cut_short = object_store.object_infos(f"{checkpoints}/last.ckpt")
    assert model in cut_short and "latest" not in cut_short  # incomplete

    monkeypatch.setattr(object_store, "upload", real_upload)
    with caplog.at_level(logging.INFO, logger="trainer.checkpoint.resume"):
        result = run_train(compose_config("train", [*overrides, "trainer.max_steps=3", "ckpt_path=last"]))
    assert result["global_step"] == 3
    assert f"resume: from {checkpoints}/step-0000002.ckpt" in caplog.text  # the incomplete last.ckpt is older
    # save_top_k=1: step 1 went at step 2, but step 2 stays at step 3: the run resumed from it (as on local disk)
    assert names(checkpoints) == {"step-0000002.ckpt", "step-0000003.ckpt", "last.ckpt"}
    last = resolve_resume_checkpoint("last", checkpoints, tmp_path / "cache")
    assert Path(last).name == "last.ckpt" and Path(last).is_dir()
    reference = tmp_path / "uninterrupted"  # local checkpoints
    run_train(compose_config("train", [*tiny_train_overrides(latent_dir, reference, steps=3), *ds]))
    assert_resume_is_exact(Path(last), reference / "checkpoints" / "step-0000003.ckpt", ranks=1)


def test_a_requeue_after_the_first_folder_upload_was_cut_short_starts_afresh(
    latent_dir, s3_server, s3_bucket, tmp_path, monkeypatch
):
    """The first DeepSpeed checkpoint's ``latest`` never arrives (a preemption's forced exit, the store gone):
    the same command again with ``auto_resume=true`` starts at step 0 and completes, as after a local partial
    write, instead of failing with "no complete checkpoint" on every requeue."""
    checkpoints = f"{s3_bucket}/run/checkpoints"
    overrides = [
        *tiny_train_overrides(latent_dir, tmp_path / "run", steps=2),
        "strategy=deepspeed_stage_2", "trainer.devices=1", "callbacks.model_checkpoint.every_n_train_steps=1",
        f"callbacks.model_checkpoint.dirpath={checkpoints}", "auto_resume=true",
    ]  # fmt: skip
    real_upload = fail_upload_when(monkeypatch, s3_server, lambda url: url.endswith("step-0000001.ckpt/latest"))
    with pytest.raises(object_store.ObjectStoreError, match=r"step-0000001\.ckpt/latest at endpoint"):
        run_train(compose_config("train", overrides))
    assert "latest" not in object_store.object_infos(f"{checkpoints}/step-0000001.ckpt")
    monkeypatch.setattr(object_store, "upload", real_upload)
    assert run_train(compose_config("train", overrides))["global_step"] == 2
    assert "latest" in object_store.object_infos(f"{checkpoints}/step-0000002.ckpt")


def test_the_autoencoder_resumes_from_the_bucket_exactly(raw_shards, s3_bucket, tmp_path):
    """Stopped at step 2 with its checkpoints in the bucket, then the same command with ``ckpt_path=last`` to
    step 4: the training state (weights, optimizer, schedule, data position and RNG restored) and the saved
    VAE's scaling factor equal an uninterrupted 4-step run's on local disk, ``last.ckpt`` is rewritten (no
    ``last-v1.ckpt``) and the downloaded copy is removed."""
    checkpoints, out = f"{s3_bucket}/vae/checkpoints", tmp_path / "run"
    run_train_autoencoder(compose_config("train_autoencoder", autoencoder_overrides(raw_shards, out, checkpoints, 2)))
    assert names(checkpoints) == {"step-0000002.ckpt", "last.ckpt"}
    local = tmp_path / "local"
    overrides = autoencoder_overrides(raw_shards, local, str(local / "checkpoints"), 4)
    uninterrupted = run_train_autoencoder(compose_config("train_autoencoder", overrides))

    overrides = [*autoencoder_overrides(raw_shards, out, checkpoints, 4), "ckpt_path=last"]
    from_bucket = run_train_autoencoder(compose_config("train_autoencoder", overrides))
    assert names(checkpoints) == {"step-0000004.ckpt", "last.ckpt"}  # last.ckpt rewritten, not last-v1.ckpt
    assert list((out / "checkpoint-cache").iterdir()) == [], "the downloaded copy is removed once loaded"
    assert from_bucket["scaling_factor"] == uninterrupted["scaling_factor"]
    object_store.download(f"{checkpoints}/last.ckpt", tmp_path / "resumed.ckpt")
    a, b = (
        torch.load(p, map_location="cpu", weights_only=True)
        for p in (tmp_path / "resumed.ckpt", local / "checkpoints" / "last.ckpt")
    )
    assert a["global_step"] == 4
    for key in ("global_step", "state_dict", "optimizer_states", "lr_schedulers", "ImageShardDataModule"):
        assert_same_nested(a[key], b[key], key)
