"""The compiled UNet (on by default on CUDA) trains, checkpoints without ``_orig_mod.`` keys, keeps
its EMA, resumes exactly, exports and samples, alone and under DeepSpeed ZeRO-2 in bf16. On CPU the
compile runs through dynamo's ``aot_eager`` backend (inductor's code generation needs a GPU to pay
off); the graph capture, the in-place module and the checkpoint names are what is tested."""

from __future__ import annotations

import pytest

from tests.integration.precision_matrix import check_combination, run_matrix

pytestmark = pytest.mark.slow
COMPILED = ("model.compile_unet=true", "model.compile_options={backend:aot_eager}")
EXPECTED = {
    "single": {"weights": "torch.float32", "input": "torch.float32", "autocast": "torch.bfloat16"},
    "deepspeed_stage_2": {"weights": "torch.bfloat16", "input": "torch.bfloat16", "autocast": None},
}


@pytest.mark.parametrize("strategy", ["single", "deepspeed_stage_2"])
def test_compiled_unet_trains_resumes_exports_and_samples(latent_dir, tmp_path, strategy, caplog):
    with caplog.at_level("INFO"):
        run_matrix(latent_dir, tmp_path / "runs", strategy, ["bf16-mixed"], devices=1, extra=COMPILED)
    assert "torch.compile: the first training batch took" in caplog.text
    check_combination(tmp_path / "runs" / "bf16-mixed", EXPECTED[strategy], tmp_path, ranks=1)
