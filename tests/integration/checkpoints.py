"""Comparing training checkpoints bit for bit: what the exact-resume tests share."""

from __future__ import annotations

from pathlib import Path

import torch

from trainer.checkpoint.reading import load_checkpoint


def assert_same_nested(a, b, where="checkpoint"):
    """Tensors equal bit for bit, everything else equal, through dicts, lists, tuples and objects' attributes."""
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_same_nested(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same_nested(x, y, f"{where}[{i}]")
    elif isinstance(a, (int, float, str, bytes, type(None))):
        assert a == b, f"{where}: {a!r} != {b!r}"
    else:  # an object DeepSpeed pickles into its partition files (its loss scaler): its attributes
        assert type(a) is type(b), where
        assert_same_nested(vars(a), vars(b), f"{where}.{type(a).__name__}")


def consumed_batches(position: dict) -> dict[str, int]:
    """Batches consumed per stream in a data module's checkpointed position: ``{"": n}`` for one
    stream (``LatentShardDataModule``), ``{"instance": n, "class": m}`` for DreamBooth's two."""
    if "batches" in position:
        return {"": position["batches"]}
    return {name: stream["batches"] for name, stream in position.items()}


def assert_resume_is_exact(
    resumed: Path, uninterrupted: Path, ranks: int = 2, data_module: str = "LatentShardDataModule"
) -> None:
    """Two checkpoints (files or DeepSpeed folders) hold the same training state, bit for bit.

    Weights, EMA, optimizer state (under ZeRO: each of the ``ranks`` partitions), LR schedule, step
    and data position (of the data module class ``data_module``).
    """
    a, b = load_checkpoint(resumed), load_checkpoint(uninterrupted)
    for key in ("global_step", "state_dict", "current_model_state", "optimizer_states", "lr_schedulers"):
        if key in b:
            assert_same_nested(a[key], b[key], key)
    assert consumed_batches(a[data_module]) == consumed_batches(b[data_module])
    partitions = sorted(p.name for p in (uninterrupted / "checkpoint").glob("*zero_pp_rank_*_optim_states.pt"))
    assert uninterrupted.is_file() or len(partitions) == ranks, "a ZeRO checkpoint holds each rank's partition"
    for name in partitions:
        # weights_only=False on purpose: DeepSpeed pickles its own objects into these partition
        # files (it loads them the same way), and these are files this test session just wrote.
        states = [
            torch.load(p / "checkpoint" / name, map_location="cpu", weights_only=False)
            for p in (resumed, uninterrupted)
        ]
        assert_same_nested(*(state["optimizer_state_dict"] for state in states), name)
