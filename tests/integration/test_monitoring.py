"""What a run logs: losses per timestep range, grad norm, throughput, validation images (CSV and
W&B offline), the digits accuracy during training, and no secrets in what it writes."""

import csv

import pytest

from tests.conftest import compose_config, tiny_train_overrides
from trainer.checkpoint.reading import load_checkpoint
from trainer.cli.train import run_train

pytestmark = pytest.mark.slow

SECRET = "wandb-key-that-must-not-leak-0123456789"


@pytest.fixture(scope="module")
def monitored_run(latent_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("monitored")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("WANDB_API_KEY", SECRET)
        patch.setenv("WANDB_MODE", "offline")
        metrics = run_train(
            compose_config(
                "train",
                [
                    *tiny_train_overrides(latent_dir, out, steps=4),
                    "logger=csv_wandb",
                    "logger.wandb.offline=true",
                    "callbacks=with_validation_images",
                    "callbacks.validation_images.prompts=[a handwritten digit one]",
                    "callbacks.validation_images.every_n_steps=2",
                    "callbacks.validation_images.steps=2",
                    "+callbacks.digits_accuracy._target_=trainer.callbacks.validation_images.DigitsAccuracy",
                    "+callbacks.digits_accuracy.every_n_steps=4",
                    "+callbacks.digits_accuracy.images_per_digit=1",
                    "+callbacks.digits_accuracy.steps=2",
                ],
            )
        )
    return out, metrics


def test_losses_grad_norm_and_throughput_are_logged(monitored_run):
    out, _ = monitored_run
    with open(out / "csv" / "version_0" / "metrics.csv") as handle:
        columns = set(next(csv.reader(handle)))
    # the UNet's parameter group is named (optim.unet_lr ...): Lightning's LR monitor logs it by that name
    assert {"train/loss", "train/grad_norm", "lr-AdamW/unet", "train/samples"} <= columns
    assert any(c.startswith("train/loss_t") for c in columns)


def test_validation_images_reach_csv_and_wandb(monitored_run):
    out, _ = monitored_run
    images = sorted(p.name for p in (out / "csv" / "version_0" / "images").glob("*.png"))
    assert images == ["val-step0000004.png", "validation-step0000002.png", "validation-step0000004.png"]
    wandb_media = list((out / "wandb").glob("offline-run-*/files/media/images/*.png"))
    assert wandb_media, "W&B offline run holds the logged images"


def test_digits_accuracy_is_a_metric(monitored_run):
    out, metrics = monitored_run
    assert 0.0 <= metrics["val/conditional_accuracy"] <= 1.0
    with open(out / "csv" / "version_0" / "metrics.csv") as handle:
        assert "val/conditional_accuracy" in next(csv.reader(handle))


def test_no_secret_in_what_the_run_writes(monitored_run):
    out, _ = monitored_run
    written = [
        p for p in out.rglob("*") if p.is_file() and p.suffix in (".yaml", ".json", ".csv", ".log", ".txt", ".wandb")
    ]
    assert any(p.name == "hparams.yaml" for p in written)
    for path in written:
        assert SECRET.encode() not in path.read_bytes(), path
    checkpoint = load_checkpoint(out / "checkpoints" / "last.ckpt")
    assert SECRET not in repr(checkpoint["latentforge"]["train_config"])


def test_tensorboard_gets_scalars_and_images(latent_dir, tmp_path):
    run_train(
        compose_config(
            "train",
            [
                *tiny_train_overrides(latent_dir, tmp_path, steps=2),
                "logger=tensorboard",
                "callbacks=with_validation_images",
                "callbacks.validation_images.prompts=[a handwritten digit one]",
                "callbacks.validation_images.every_n_steps=2",
                "callbacks.validation_images.steps=2",
            ],
        )
    )
    scalars, images = read_event_tags(tmp_path / "tensorboard")
    assert "train/loss" in scalars and "validation" in images


def read_event_tags(folder):
    """Scalar and image tags in TensorBoard event files (TFRecord framing of ``Event`` protos)."""
    import struct

    from tensorboardX.proto.event_pb2 import Event

    scalars, images = set(), set()
    for path in folder.rglob("events.out.tfevents.*"):
        data = path.read_bytes()
        offset = 0
        while offset < len(data):
            (length,) = struct.unpack_from("<Q", data, offset)
            event = Event.FromString(data[offset + 12 : offset + 12 + length])
            offset += 12 + length + 4
            for value in event.summary.value:
                (images if value.HasField("image") else scalars).add(value.tag)
    return scalars, images
