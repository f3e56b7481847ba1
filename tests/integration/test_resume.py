"""Exact resume on one CPU process: stopped (max_steps, a damaged newest checkpoint, SIGKILL, a
preemption signal, a full disk) and resumed runs end with the same weights, EMA and optimizer state
as an uninterrupted run; ``lf-train-autoencoder`` resumes by the same rules (``auto_resume``, damaged
checkpoints passed over).

Gradient accumulation 2, 16 samples a batch, 6 batches an epoch: the runs cross epoch boundaries.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
from pathlib import Path

import pytest
import torch

from data_pipelines.shards.resumable_loader import LoaderWorkerDied
from lf_common.errors import StorageError
from tests.conftest import autoencoder_overrides, compose_config, tiny_train_overrides
from tests.integration.cli import kill_cli_when, run_cli
from tests.integration.faults import FAULTS_ENV, inject
from trainer.checkpoint.export import EXPORT_INFO_NAME
from trainer.checkpoint.reading import load_checkpoint
from trainer.checkpoint.resume import checkpoint_step, resolve_resume_checkpoint
from trainer.cli.export import run_export
from trainer.cli.train import run_train
from trainer.cli.train_autoencoder import run_train_autoencoder

pytestmark = pytest.mark.slow

STEPS = 5


def resume_overrides(latent_dir: Path, out: Path, steps: int, *extra: str) -> list[str]:
    return [
        *tiny_train_overrides(latent_dir, out, steps=steps),
        "trainer.accumulate_grad_batches=2",
        "callbacks.ema.decay=0.5",
        *extra,
    ]


def train(latent_dir: Path, out: Path, steps: int, *extra: str) -> dict:
    return run_train(compose_config("train", resume_overrides(latent_dir, out, steps, *extra)))


def final_state(out: Path) -> dict:
    return load_checkpoint(out / "checkpoints" / "last.ckpt")  # EMA in state_dict, raw in current_model_state


def assert_same_training_state(a: dict, b: dict, data: str = "LatentShardDataModule") -> None:
    """Raw weights, EMA, optimizer state, LR schedule, counters and data position (of the data module class
    ``data``): bit-identical."""
    assert a["global_step"] == b["global_step"]
    for key in ("current_model_state", "state_dict"):
        assert a[key].keys() == b[key].keys()
        different = [k for k in a[key] if not torch.equal(a[key][k], b[key][k])]
        assert not different, f"{key}: {len(different)} tensors differ, e.g. {different[:3]}"
    (opt_a,), (opt_b,) = a["optimizer_states"], b["optimizer_states"]
    for index, state in opt_a["state"].items():
        for name, value in state.items():
            assert torch.equal(value, opt_b["state"][index][name]), f"optimizer state {index}.{name}"
    assert a["lr_schedulers"] == b["lr_schedulers"]
    position_a, position_b = a[data], b[data]
    assert (position_a["batches"], position_a["samples"]) == (position_b["batches"], position_b["samples"])


@pytest.fixture(scope="module")
def uninterrupted(latent_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    assert train(latent_dir, out, STEPS)["global_step"] == STEPS
    state = final_state(out)
    assert state["LatentShardDataModule"]["batches"] == 2 * STEPS
    return state


def test_stopped_at_max_steps_then_resumed_is_exact(uninterrupted, latent_dir, tmp_path, caplog):
    """Also: a save that takes over half the preemption grace period (here a grace of 1 ms) is warned about once."""
    with caplog.at_level(logging.INFO, logger="trainer.callbacks.checkpoint"):
        train(latent_dir, tmp_path, 3, "callbacks.preemption.grace_period_s=0.001")  # 6 batches: ends an epoch
    assert final_state(tmp_path)["global_step"] == 3
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "over half of callbacks.preemption.grace_period_s=0.001" in warnings[0], warnings
    assert "step-0000002.ckpt was written in" in warnings[0]  # the first save
    assert any("last.ckpt written in" in r.getMessage() for r in caplog.records if r.levelno == logging.INFO)
    train(latent_dir, tmp_path, STEPS, "ckpt_path=last")
    assert_same_training_state(final_state(tmp_path), uninterrupted)


def test_damaged_newest_checkpoint_is_passed_over(uninterrupted, latent_dir, tmp_path, caplog):
    train(latent_dir, tmp_path, 3)
    checkpoints = tmp_path / "checkpoints"
    for name in ("last.ckpt", "step-0000003.ckpt"):  # the newest two: truncated as by a full disk
        path = checkpoints / name
        with open(path, "r+b") as handle:
            handle.truncate(path.stat().st_size // 2)
    with caplog.at_level(logging.WARNING, logger="trainer.checkpoint.resume"):
        train(latent_dir, tmp_path, STEPS, "ckpt_path=last")
    message = caplog.text
    assert "last.ckpt (truncated" in message or "last.ckpt (not a complete" in message
    assert "step-0000003.ckpt (" in message and "resuming from" in message and "step-0000002.ckpt" in message
    assert_same_training_state(final_state(tmp_path), uninterrupted)


def test_resolve_refuses_a_folder_without_complete_checkpoints(tmp_path):
    from lf_common.errors import DataError

    (tmp_path / "step-0000002.ckpt").write_bytes(b"not a zip")
    with pytest.raises(DataError, match=r"no complete checkpoint .* step-0000002.ckpt \(not a complete"):
        resolve_resume_checkpoint("last", tmp_path)
    with pytest.raises(DataError, match="does not exist; set output_dir"):
        resolve_resume_checkpoint("last", tmp_path / "missing")
    with pytest.raises(DataError, match=r"step-0000009\.ckpt: checkpoint does not exist"):
        resolve_resume_checkpoint(str(tmp_path / "step-0000009.ckpt"), None)


def test_sigkilled_run_resumes_exactly(latent_dir, tmp_path):
    """Kill the process group of a running lf-train after its second checkpoint; resume from `last`."""
    killed = tmp_path / "killed"
    overrides = resume_overrides(latent_dir, killed, 1000, "callbacks.model_checkpoint.save_top_k=-1")
    kill_cli_when(killed / "checkpoints" / "step-0000004.ckpt", "lf-train", *overrides, cwd=tmp_path)
    resumed_from = resolve_resume_checkpoint("last", killed / "checkpoints")
    target = (checkpoint_step(resumed_from) or final_state(killed)["global_step"]) + 2
    train(latent_dir, killed, target, "ckpt_path=last", "callbacks.model_checkpoint.save_top_k=-1")
    reference = tmp_path / "reference"
    train(latent_dir, reference, target)
    assert_same_training_state(final_state(killed), final_state(reference))
    shutil.rmtree(killed)


def test_preemption_signal_at_a_random_step_checkpoints_it_and_resumes_exactly(uninterrupted, latent_dir, tmp_path):
    """SIGUSR1 at a micro-batch drawn from a seed: exit 75 with a checkpoint of the step it was in; the same
    command again (``auto_resume=true``) finishes the run, equal to the uninterrupted one."""
    rng = random.Random(15)
    step, micro = rng.randrange(STEPS - 1), rng.randrange(2)  # accumulation 2: maybe mid-step
    out = tmp_path / "run"
    command = [
        *resume_overrides(latent_dir, out, STEPS, "auto_resume=true"),
        *inject("signal", "SignalAt", marker=out / "signal-sent", step=step, micro=micro, signal="SIGUSR1"),
    ]
    preempted = run_cli("lf-train", *command, cwd=tmp_path, env=FAULTS_ENV)
    assert preempted.returncode == 75, preempted.stderr[-3000:]
    assert f"preempted by SIGUSR1 at step {step + 1}" in preempted.stdout
    assert final_state(out)["global_step"] == step + 1, "the checkpoint holds the step the signal came in"
    resumed = run_cli("lf-train", *command, cwd=tmp_path, env=FAULTS_ENV)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {out / 'checkpoints' / 'last.ckpt'} at step {step + 1}" in resumed.stdout
    assert_same_training_state(final_state(out), uninterrupted)


def test_full_disk_mid_checkpoint_keeps_the_previous_one_and_names_the_path(uninterrupted, latent_dir, tmp_path):
    """ENOSPC halfway through the step-4 checkpoint: the run stops naming the path and the space, no partial
    file stays, and the step-2 checkpoint resumes exactly."""
    fault = inject("disk", "FullDiskAt", marker=tmp_path / "disk-full", step=4)
    with pytest.raises(StorageError) as error:
        train(latent_dir, tmp_path, STEPS, *fault)
    message = str(error.value)
    assert f"writing {tmp_path / 'checkpoints' / 'step-0000004.ckpt'} failed: No space left on device" in message
    assert "needed" in message and "free on" in message and "step-0000002.ckpt is complete" in message
    assert not list((tmp_path / "checkpoints").glob("*.partial")), "the partial write is removed"
    train(latent_dir, tmp_path, STEPS, *fault, "auto_resume=true")
    assert_same_training_state(final_state(tmp_path), uninterrupted)


def test_a_killed_loader_worker_is_named_and_the_same_command_resumes(uninterrupted, latent_dir, tmp_path):
    """The OOM killer's SIGKILL to the data-loader worker at step 3: the run stops with LoaderWorkerDied
    naming the rank and the fix; the same command (``auto_resume=true``) resumes from the step-2 checkpoint
    and ends equal to the uninterrupted run (one worker streams what the main process does)."""
    out = tmp_path / "run"
    command = [
        *resume_overrides(latent_dir, out, STEPS, "data.num_workers=1", "auto_resume=true"),
        *inject("oom", "KillLoaderWorkersAt", marker=out / "workers-killed", step=3),
    ]
    with pytest.raises(LoaderWorkerDied, match=r"rank 0: a data-loader worker died .* lower data.num_workers"):
        run_train(compose_config("train", command))
    assert run_train(compose_config("train", command))["global_step"] == STEPS
    assert_same_training_state(final_state(out), uninterrupted)


def test_the_autoencoder_auto_resumes_past_a_damaged_checkpoint(raw_shards, tmp_path, caplog):
    """``lf-train-autoencoder`` resumes as ``lf-train`` does (one resolution): ``auto_resume=true`` starts afresh
    in an empty run folder, and in a run whose two newest checkpoints were damaged (truncated as by a full disk)
    passes over them, says so, and continues from the complete one before them to ``max_steps``."""
    out = tmp_path / "run"
    checkpoints = out / "checkpoints"

    def overrides(steps: int) -> list[str]:
        return [
            *autoencoder_overrides(raw_shards, out, str(checkpoints), steps),
            "callbacks.model_checkpoint.save_top_k=-1",
            "auto_resume=true",
        ]

    with caplog.at_level(logging.INFO, logger="trainer.checkpoint.resume"):
        assert run_train_autoencoder(compose_config("train_autoencoder", overrides(4)))["global_step"] == 4
    assert "auto_resume: no checkpoint" in caplog.text
    assert sorted(p.name for p in checkpoints.iterdir()) == ["last.ckpt", "step-0000002.ckpt", "step-0000004.ckpt"]
    for name in ("last.ckpt", "step-0000004.ckpt"):
        path = checkpoints / name
        with open(path, "r+b") as handle:
            handle.truncate(path.stat().st_size // 2)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="trainer.checkpoint.resume"):
        result = run_train_autoencoder(compose_config("train_autoencoder", overrides(6)))
    passed_over = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(passed_over) == 1, caplog.text
    assert "last.ckpt (" in passed_over[0] and "step-0000004.ckpt (" in passed_over[0]
    assert passed_over[0].endswith(f"resuming from {checkpoints / 'step-0000002.ckpt'}")
    assert result["global_step"] == 6
    assert torch.load(checkpoints / "last.ckpt", weights_only=True)["global_step"] == 6
    assert result["checkpoint"] == str((checkpoints / "last.ckpt").resolve())


def test_two_datasets_stopped_mid_epoch_resume_exactly(latent_dir, tmp_path):
    """data=mixed, a set with repeats beside a regularization set: stopped mid-epoch and resumed, the run
    equals the uninterrupted one; the loss is logged per dataset."""
    reg = tmp_path / "reg"
    shutil.copytree(latent_dir, reg)
    entries = f"[{{path:{latent_dir},repeats:2,name:subject}},{{path:{reg},is_reg:true,name:reg}}]"
    mixed = ["data=mixed", f"data.datasets={entries}", "data.prior_loss_weight=0.5"]

    def mixed_train(out: Path, steps: int, *extra: str) -> dict:
        overrides = [o for o in resume_overrides(latent_dir, out, steps, *extra) if not o.startswith("data.train_dir")]
        return run_train(compose_config("train", [*overrides, *mixed]))

    metrics = mixed_train(tmp_path / "uninterrupted", 4)
    assert {"train/loss_subject", "train/loss_reg"} <= set(metrics), sorted(metrics)
    mixed_train(tmp_path / "resumed", 3)  # 6 of the epoch's 18 batches
    mixed_train(tmp_path / "resumed", 4, "ckpt_path=last")
    reference, resumed = final_state(tmp_path / "uninterrupted"), final_state(tmp_path / "resumed")
    assert_same_training_state(resumed, reference, data="MixedLatentDataModule")
    assert resumed["MixedLatentDataModule"]["datasets"][1]["is_reg"] is True
    # the provenance records both folders, and the export lists them
    run_export(compose_config("export", [f"ckpt_path={tmp_path / 'resumed/checkpoints/last.ckpt'}",
                                         f"out_dir={tmp_path / 'export'}"]))  # fmt: skip
    listed = json.loads((tmp_path / "export" / EXPORT_INFO_NAME).read_text())["datasets"]
    assert [(d["path"], d["name"], d["repeats"], d["is_reg"]) for d in listed] == [
        (str(latent_dir), "subject", 2, False), (str(reg), "reg", None, True)
    ]  # fmt: skip
    assert [d["num_samples"] for d in listed] == [96, 96]


def test_a_run_drawing_stored_image_variants_resumes_exactly(raw_shards, pretrained_dir, tmp_path):
    """Latents with mirror images (lf-precompute flip=true): each step draws a variant per sample; a run
    stopped at step 2 and resumed to 4 ends bit-identical to one that ran 4 steps (the draw follows the
    restored stream position)."""
    from hydra.utils import instantiate

    from tests.conftest import precompute_digits

    latents = tmp_path / "latents"
    precompute_digits(raw_shards, pretrained_dir, latents, "flip=true")
    data = instantiate(compose_config("train", resume_overrides(latents, tmp_path, 4)).data)
    assert next(iter(data.train_dataloader()))["latents_variants"].shape[:2] == (16, 2)
    train(latents, tmp_path / "stopped", 2)
    train(latents, tmp_path / "stopped", 4, "ckpt_path=last")
    train(latents, tmp_path / "whole", 4)
    assert_same_training_state(final_state(tmp_path / "stopped"), final_state(tmp_path / "whole"))
