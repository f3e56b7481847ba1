"""Throughput callback: images/s, samples seen and MFU from the UNet's counted FLOPs."""

import csv

import pytest
import torch
from hydra.utils import instantiate

from tests.conftest import compose_config, tiny_train_overrides
from trainer.callbacks.throughput import unet_train_flops
from trainer.cli.train import run_train

pytestmark = pytest.mark.slow


def test_flops_counted_on_the_meta_device_match_a_real_count():
    from torch.utils.flop_counter import FlopCounterMode

    unet = instantiate(compose_config("train", ["data.train_dir=x", "output_dir=o"]).model.unet)
    latents, text = torch.randn(2, 4, 8, 8), torch.randn(2, 8, 32)
    with FlopCounterMode(display=False) as counter:
        unet(latents, torch.tensor([1, 500]), encoder_hidden_states=text).sample.sum().backward()
    counted = unet_train_flops(dict(unet.config), latents.shape, text.shape)
    assert counted == pytest.approx(counter.get_total_flops(), rel=0.01) and counted > 0


def test_throughput_and_mfu_are_logged(latent_dir, tmp_path):
    overrides = [
        *tiny_train_overrides(latent_dir, tmp_path, steps=4),
        "callbacks.throughput.window_size=2",
        "callbacks.throughput.available_flops=1e12",
    ]
    run_train(compose_config("train", overrides))
    with open(tmp_path / "csv" / "version_0" / "metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    logged = [r for r in rows if r.get("train/device/mfu")]
    assert logged, f"no MFU among {sorted(rows[0])}"
    assert 0 < float(logged[-1]["train/device/mfu"]) < 1
    assert float(logged[-1]["train/device/samples_per_sec"]) > 0  # train/samples_per_sec: all ranks, when > 1
    assert max(float(r["train/samples"]) for r in rows if r.get("train/samples")) == 4 * 16
