"""Train one strategy (or several in turn) in several precisions in one launch, for ``test_precision_matrix.py``.

Run as ``python -m tests.integration.precision_matrix`` (one process) or under
``torchrun --nproc_per_node=2`` (Lightning takes the ranks from torchrun), so the imports and the
process group are paid once per strategy, not once per run. For each precision it trains, through
``run_train`` and the real configs:

* ``<out>/<precision>/full``: 4 optimizer steps (gradient accumulation 2, across the epoch's end)
  with a checkpoint every 2 steps, all kept, EMA on;
* ``<out>/<precision>/resumed``: from ``full``'s step-2 checkpoint to step 4 in a folder of its own.

A precision given a bucket (``--bucket=PRECISION=s3://...``) writes both runs' checkpoints there
(``<url>/full``, ``<url>/resumed``) and resumes from the bucket's step-2 checkpoint;
:func:`fetch_remote_checkpoints` then downloads them to where the local runs keep theirs.
:func:`check_combination` then checks what one precision's two runs wrote.

:class:`UNetInputProbe` (added through the config, like any callback) records what the UNet was
fed and held in its first training forward, in ``<run>/unet_inputs.json``.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
from pathlib import Path
from typing import Any

import lightning as L
import torch
from diffusers import DiffusionPipeline
from lightning.pytorch.callbacks import Callback
from safetensors.torch import load_file

from lf_common import object_store
from tests.integration.checkpoints import assert_resume_is_exact
from trainer.checkpoint.reading import load_checkpoint
from trainer.cli.export import run_export
from trainer.cli.hydra_app import compose_config
from trainer.cli.train import run_train
from trainer.sampling.sampler import Sampler, SampleSettings

STEPS = 4
RESUME_FROM = 2


class UNetInputProbe(Callback):
    """Records, on rank 0, the UNet's weight dtype, its input's dtype and the autocast dtype (or
    ``None``) in its first training forward."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)
        self._handle: Any = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            self._handle = pl_module.unet.register_forward_pre_hook(self._record, with_kwargs=True)

    def _record(self, unet: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        sample = args[0] if args else kwargs["sample"]
        device = sample.device.type
        record = {
            "weights": str(next(unet.parameters()).dtype),
            "input": str(sample.dtype),
            "autocast": str(torch.get_autocast_dtype(device)) if torch.is_autocast_enabled(device) else None,
        }
        self.path.write_text(json.dumps(record))
        self._handle.remove()


def run_overrides(
    latent_dir: Path,
    out: Path,
    strategy: str,
    precision: str,
    devices: int,
    accelerator: str = "cpu",
    warmup: bool = True,
    ema: bool = True,
) -> list[str]:
    """``lf-train`` overrides of one matrix run (4 steps, accumulation 2, checkpoints every 2 steps, all kept);
    ``warmup``: the LR scheduler's warm-up shortened to 1 step (false: an optimizer that chose a scheduler
    without one, ``optim=schedule_free_adamw``); the EMA at decay 0.5 unless ``ema`` is false (the run keeps its
    config's, e.g. none for LoRA experiments)."""
    return [
        f"strategy={strategy}",
        f"trainer.devices={devices}",
        f"trainer.precision={precision}",
        f"trainer.accelerator={accelerator}",
        f"data.train_dir={latent_dir}",
        "data.batch_size=8",
        "data.num_workers=0",
        f"output_dir={out}",
        f"trainer.max_steps={STEPS}",
        "trainer.accumulate_grad_batches=2",
        "trainer.log_every_n_steps=1",
        "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false",
        *(["lr_scheduler.num_warmup_steps=1"] if warmup else []),
        "callbacks.model_checkpoint.every_n_train_steps=2",
        "callbacks.model_checkpoint.save_top_k=-1",
        *(["callbacks.ema.decay=0.5"] if ema else []),
        "+callbacks.unet_inputs._target_=tests.integration.precision_matrix.UNetInputProbe",
        f"+callbacks.unet_inputs.path={out / 'unet_inputs.json'}",
    ]


def run_matrix(
    latent_dir: Path,
    out: Path,
    strategy: str,
    precisions: list[str],
    devices: int,
    accelerator: str = "cpu",
    extra: tuple[str, ...] = (),
    buckets: dict[str, str] | None = None,
    warmup: bool = True,
    ema: bool = True,
) -> None:
    """The two runs of each precision (see the module docstring); ``extra`` overrides are added to both;
    ``buckets``: per precision, the URL its runs' checkpoints go under (``<url>/full``, ``<url>/resumed``);
    ``warmup``, ``ema``: as :func:`run_overrides`."""
    for precision in precisions:
        full, resumed = out / precision / "full", out / precision / "resumed"
        remote = (buckets or {}).get(precision)
        folder = {"full": [], "resumed": []}
        if remote:
            folder = {run: [f"callbacks.model_checkpoint.dirpath={remote}/{run}"] for run in folder}
        run_train(
            compose_config(
                "train",
                [
                    *run_overrides(latent_dir, full, strategy, precision, devices, accelerator, warmup=warmup, ema=ema),
                    *extra,
                    *folder["full"],
                ],
            )
        )
        checkpoint = f"{remote}/full" if remote else full / "checkpoints"
        overrides = [
            *run_overrides(latent_dir, resumed, strategy, precision, devices, accelerator, warmup=warmup, ema=ema),
            *extra,
            *folder["resumed"],
            f"ckpt_path={checkpoint}/step-{RESUME_FROM:07d}.ckpt",
        ]
        run_train(compose_config("train", overrides))


def fetch_remote_checkpoints(url: str, out: Path) -> None:
    """Download the checkpoints :func:`run_matrix` wrote under ``url`` for one precision into
    ``<out>/full/checkpoints`` and ``<out>/resumed/checkpoints``, where a local run keeps them, after checking
    that they went to the bucket only: none on local disk, the staged copies removed after their upload, the
    resumed run's downloaded copy of its step-2 checkpoint removed once loaded."""
    for run in ("full", "resumed"):
        assert not (out / run / "checkpoints").exists(), "the checkpoints go to the bucket only"
        assert not [p for p in (out / run / "checkpoint-staging").rglob("*") if p.is_file()], "staged copies removed"
        for name in object_store.object_infos(f"{url}/{run}"):  # files, and the files of DeepSpeed folders
            target = out / run / "checkpoints" / name
            target.parent.mkdir(parents=True, exist_ok=True)
            object_store.download(f"{url}/{run}/{name}", target)
    assert list((out / "resumed" / "checkpoint-cache").iterdir()) == [], "the resumed copy is removed"


def logged_losses(run: Path) -> list[float]:
    (metrics,) = (run / "csv").rglob("metrics.csv")  # rank 0's logger only
    with metrics.open() as f:
        return [float(row["train/loss"]) for row in csv.DictReader(f) if row.get("train/loss")]


def differs(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return any(not torch.equal(a[k].float(), b[k].float()) for k in a)


def check_combination(
    out: Path, expected: dict[str, str | None], scratch: Path, exact_resume: bool = True, ranks: int = 2
) -> None:
    """What every strategy × precision must do (see ``test_precision_matrix.py``), checked on the
    folder :func:`run_matrix` wrote for one precision.

    Args:
        out: ``<run_matrix out>/<precision>``.
        expected: the UNet's weight, input and autocast dtypes (as :class:`UNetInputProbe` records them).
        scratch: a folder for the export.
        exact_resume: compare the resumed run with the uninterrupted one bit for bit (CPU runs are
            deterministic; CUDA kernels need not be).
        ranks: the processes that trained (a ZeRO checkpoint holds one optimizer partition each).
    """
    full, resumed = out / "full", out / "resumed"
    assert json.loads((full / "unet_inputs.json").read_text()) == expected
    losses = logged_losses(full)
    assert len(losses) >= STEPS and all(math.isfinite(x) for x in losses), losses

    checkpoints = full / "checkpoints"
    at_resume = load_checkpoint(checkpoints / f"step-{RESUME_FROM:07d}.ckpt")
    at_end = load_checkpoint(checkpoints / f"step-{STEPS:07d}.ckpt")
    ema, raw = at_end["state_dict"], at_end["current_model_state"]
    assert not [k for k in (*ema, *raw) if "_orig_mod" in k], "parameter names are the UNet's own (compiled or not)"
    assert differs(at_resume["current_model_state"], raw), "the weights trained"
    assert differs(at_resume["state_dict"], ema), "the EMA updated"
    assert differs(ema, raw), "the EMA is not the raw weights"
    assert {v.dtype for v in ema.values() if v.is_floating_point()} == {torch.float32}, "the EMA averages in float32"

    # resume: exact, and the checkpoint it resumed from is not written again
    assert sorted(p.name for p in (resumed / "checkpoints").iterdir()) == ["last.ckpt", f"step-{STEPS:07d}.ckpt"]
    if exact_resume:
        assert_resume_is_exact(resumed / "checkpoints" / "last.ckpt", checkpoints / f"step-{STEPS:07d}.ckpt", ranks)

    # export: diffusers loads and runs it; the sampler runs from the checkpoint itself
    export = scratch / "export"
    run_export(compose_config("export", [f"ckpt_path={checkpoints / f'step-{STEPS:07d}.ckpt'}", f"out_dir={export}"]))
    exported = load_file(export / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(exported[k.removeprefix("unet.")], v) for k, v in ema.items()), "export holds the EMA"
    pipe = DiffusionPipeline.from_pretrained(export, local_files_only=True)  # the class model_index.json names
    image = pipe("a handwritten digit seven", num_inference_steps=2, height=32, width=32, output_type="np").images[0]
    assert image.shape == (32, 32, 3) and torch.isfinite(torch.from_numpy(image)).all()
    sampler = Sampler.from_checkpoint(checkpoints / f"step-{STEPS:07d}.ckpt", device="cpu")
    images, _ = sampler.txt2img(["a handwritten digit seven"], [0], SampleSettings(steps=2))
    assert images[0].size == (32, 32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latents", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--strategy", required=True, help="comma-separated: several run in turn, each in <out>/NAME")
    parser.add_argument("--precisions", required=True, help="comma-separated")
    parser.add_argument("--extra", action="append", default=[], help="an lf-train override added to every run")
    parser.add_argument("--bucket", action="append", default=[], help="PRECISION=URL: its checkpoints go there")
    parser.add_argument(
        "--strategy-extra", action="append", default=[], help="STRATEGY=OVERRIDE: added to that strategy's runs only"
    )
    parser.add_argument("--no-ema", action="store_true", help="keep the config's EMA setting (LoRA's: none)")
    args = parser.parse_args()
    devices = int(os.environ.get("WORLD_SIZE", "1"))
    buckets = dict(item.split("=", 1) for item in args.bucket)
    strategies = args.strategy.split(",")
    own: dict[str, list[str]] = {strategy: [] for strategy in strategies}
    for item in args.strategy_extra:
        strategy, override = item.split("=", 1)
        own[strategy].append(override)
    for strategy in strategies:  # one launch: the imports and the process group are paid once
        out = args.out / strategy if len(strategies) > 1 else args.out
        extra = (*args.extra, *own[strategy])
        run_matrix(out=out, strategy=strategy, latent_dir=args.latents, precisions=args.precisions.split(","),
                   devices=devices, extra=extra, buckets=buckets, ema=not args.no_ema)  # fmt: skip


if __name__ == "__main__":
    main()
