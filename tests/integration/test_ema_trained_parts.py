"""The EMA of runs that train parts other than the UNet: textual inversion averages its new embedding rows only,
DreamBooth's trained text encoder is averaged with the UNet; export takes the averages."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import compose_config
from tests.integration.dreambooth import dreambooth_overrides
from tests.integration.test_textual_inversion import ti_overrides
from trainer.checkpoint.keys import EMA_STATE_KEY
from trainer.checkpoint.reading import load_checkpoint
from trainer.cli.export import run_export
from trainer.cli.train import run_train
from trainer.interop.safe_load import load_torch_file

pytestmark = pytest.mark.slow
EMA_ON = ("callbacks.ema={_target_:trainer.callbacks.ema.EMA,decay:0.5}",)


def test_textual_inversion_averages_the_new_rows_only_and_exports_their_average(base_model, latent_dir, tmp_path):
    run = tmp_path / "run"
    run_train(compose_config("train", [*ti_overrides(base_model, latent_dir, run), *EMA_ON]))
    saved = load_torch_file(run / "checkpoints" / "last.ckpt")
    rows = saved["latentforge"]["textual_inversion"]["row_keys"]
    assert list(saved[EMA_STATE_KEY]) == rows, "the rows, nothing of the frozen UNet or text encoder"
    average, raw = saved[EMA_STATE_KEY][rows[0]], saved["state_dict"][rows[0]]
    assert average.dtype == torch.float32 and not torch.equal(average, raw)
    run_export(
        compose_config("export", [f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}", f"out_dir={tmp_path / 'x'}"])
    )
    exported = load_file(tmp_path / "x" / "embeddings" / "d7.safetensors")["emb_params"]
    torch.testing.assert_close(exported.float(), average, rtol=0, atol=0)


def test_dreambooth_averages_the_trained_text_encoder_with_the_unet(base_model, cat_photos, tmp_path):
    run = tmp_path / "run"
    overrides = dreambooth_overrides("dreambooth_text_encoder", base_model, cat_photos, tmp_path / "cache", run, 2)
    run_train(compose_config("train", [*overrides, *EMA_ON]))
    saved = load_torch_file(run / "checkpoints" / "last.ckpt")
    trained = saved[EMA_STATE_KEY]
    assert any(k.startswith("text_encoder.") for k in trained) and any(k.startswith("unet.") for k in trained)
    frozen = set(saved["state_dict"]) - set(trained)  # buffers (position ids)
    assert not [k for k in frozen if k.endswith(("weight", "bias"))], "every weight of both trains"
    model = load_checkpoint(run / "checkpoints" / "last.ckpt")["state_dict"]
    assert all(torch.equal(model[k], v) for k, v in trained.items()), "the EMA model holds the averages"
