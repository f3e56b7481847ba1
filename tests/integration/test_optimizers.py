"""Every optimizer config trains the tiny model through ``lf-train``'s code on CPU, resumes bit for bit, and
exports; schedule-free exports its evaluation weights.

Each optimizer runs the precision matrix's two runs (``tests/integration/precision_matrix.py``: 4 steps with
gradient accumulation 2 and EMA, and a resume from the step-2 checkpoint) in ``32-true`` in this process,
and :func:`check_combination` checks them (finite losses, weights and EMA move, exact resume, export that
diffusers loads and runs, the sampler). The strategy axis: ``docs/optimizers.md`` says which ran where.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.integration.precision_matrix import STEPS, check_combination, run_matrix
from trainer.checkpoint.reading import load_checkpoint

pytestmark = pytest.mark.slow

FLOAT32 = {"weights": "torch.float32", "input": "torch.float32", "autocast": None}
OPTIMIZERS = {  # optim=NAME: overrides that make 4 steps move the tiny model's weights visibly
    "adamw8bit": ["optim.min_8bit_size=256"],  # the tiny UNet's tensors are small: 8-bit states for most
    "adafactor": ["optim.lr=1e-3"],
    "prodigy": ["optim.d0=1e-4"],
    # its own warm-up only: the option chooses lr_scheduler=constant (no num_warmup_steps for the matrix to set)
    "schedule_free_adamw": ["optim.warmup_steps=1", "optim.lr=1e-3"],
    "lion": ["optim.lr=1e-4"],
}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_optimizer_trains_resumes_and_exports(name, latent_dir: Path, tmp_path: Path):
    if name == "adamw8bit":
        pytest.importorskip("bitsandbytes", reason="optim=adamw8bit needs latentforge[lowbit]")
    run_matrix(latent_dir, tmp_path, "single", ["32-true"], devices=1, extra=(f"optim={name}", *OPTIMIZERS[name]),
               warmup=name != "schedule_free_adamw")  # fmt: skip
    check_combination(tmp_path / "32-true", FLOAT32, tmp_path / "scratch")
    state = load_checkpoint(tmp_path / "32-true" / "full" / "checkpoints" / f"step-{STEPS:07d}.ckpt")
    (optimizer,) = state["optimizer_states"]
    assert optimizer["state"], "the checkpoint holds the optimizer's state"
    if name == "schedule_free_adamw":
        assert_holds_evaluation_weights(state)


def assert_holds_evaluation_weights(state: dict) -> None:
    """The checkpoint's raw weights are the optimizer's evaluation point x, not its training point y.

    Schedule-free keeps ``z`` in its state; the training point is ``y = (1 - beta1) z + beta1 x``. Switching
    the saved weights to the training point as ``optimizer.train()`` does and back as ``optimizer.eval()``
    does must give the saved weights again (up to rounding), and the training point must differ from them.
    """
    (optimizer,) = state["optimizer_states"]
    (group,) = optimizer["param_groups"]
    beta1 = group["betas"][0]
    assert group["train_mode"] is False, "saved in evaluation mode"
    raw = [v for k, v in state["current_model_state"].items() if k.startswith("unet.")]
    zs = [optimizer["state"][i]["z"] for i in group["params"]]
    assert len(raw) == len(zs) and all(x.shape == z.shape for x, z in zip(raw, zs, strict=True))
    moved = False
    for x, z in zip(raw, zs, strict=True):
        y = x.lerp(z, 1 - beta1)  # optimizer.train()
        moved |= not torch.equal(y, x)
        torch.testing.assert_close(y.lerp(z, 1 - 1 / beta1), x)  # optimizer.eval() gives x back
    assert moved, "the training point differs from the saved (evaluation) weights"
