"""Fault injection: every fault ``lf-train`` is built to survive, injected into real runs, each followed by
the same command again (as a requeue or torchrun's restart does) until the run completes.

Each run's final checkpoint is compared, bit for bit, with an uninterrupted run of the same
configuration (``tests/integration/checkpoints.py``): weights, EMA, optimizer state, LR schedule,
step and data position. Equal means no optimizer step was lost or applied twice and no sample was
skipped or seen twice: "steps lost" and "samples lost" count the runs where that failed, in steps
(global step difference, or 1 when the state differs) and samples (data position difference).
A signal costs no work either (the checkpoint is of the step it came in); an abrupt end (SIGKILL, a
hang, a full disk, a dead loader worker) repeats the steps since the newest checkpoint (every 2
steps here), which the resumed run computes again, identically.

The faults (tiny model, 6 optimizer steps of 2 micro-batches, CPU): SIGTERM and SIGUSR1 at a step
drawn from a seed, SIGKILL of the process, ENOSPC in the middle of a checkpoint, a data-loader
worker killed (the OOM killer), all on one process; SIGTERM to one rank of a 2-process DDP run; and
under torchrun with restarts, one rank SIGKILLed and then one rank hung in validation (a 15 s
``distributed.timeout_s``) while rank 0 samples validation images for longer than that.

Run from the repository root: ``PYTHONPATH=. python bench/faults.py`` (the injectors live in
``tests/integration/faults.py``); about 15 minutes on 2 shared cores. The last line is the summary.
"""

from __future__ import annotations

import random
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from hydra.utils import instantiate

from data_pipelines.raw.writer import write_raw_shards
from tests.conftest import NUM_DIGITS, FirstDigits, compose_config
from tests.integration.checkpoints import assert_resume_is_exact
from tests.integration.cli import cli_command
from tests.integration.faults import FAULTS_ENV, inject
from trainer.checkpoint.reading import load_checkpoint
from trainer.cli.precompute import run_precompute
from trainer.tiny_models.tiny_text_encoder import save_tiny_text_encoder

STEPS, TIMEOUT_S = 6, 15
TORCHRUN_ENV = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}  # as launch/torchrun_*.sh


@dataclass
class Scenario:
    """One fault: its injection overrides, how it starts, and what the runs did."""

    name: str
    slug: str
    faults: int
    extra: list[str]
    processes: int = 1
    torchrun: bool = False
    statuses: list[int] = field(default_factory=list)
    redone: int = 0
    seconds: float = 0.0


def make_data(root: Path) -> Path:
    """Latent shards of 96 digits (a small random VAE and text encoder), as the tests' fixtures make them."""
    write_raw_shards(FirstDigits(NUM_DIGITS), root / "raw", samples_per_shard=32)
    save_tiny_text_encoder(root / "pretrained", max_length=8)
    torch.manual_seed(0)
    vae = instantiate(compose_config("train_autoencoder", ["data.shards=unused"]).autoencoder.vae)
    vae.save_pretrained(root / "pretrained" / "vae", safe_serialization=True)
    overrides = [f"shards={root / 'raw'}", f"out_dir={root / 'latents'}", f"pretrained={root / 'pretrained'}"]
    run_precompute(compose_config("precompute", [*overrides, "resolution=32", "batch_size=48"]))
    return root / "latents"


def base(latents: Path, out: Path, processes: int) -> list[str]:
    """The run every scenario and its reference share (a checkpoint every 2 steps, all kept)."""
    common = [
        f"data.train_dir={latents}",
        f"output_dir={out}",
        f"trainer.max_steps={STEPS}",
        "trainer.accumulate_grad_batches=2",
        "trainer.accelerator=cpu",
        "trainer.log_every_n_steps=1",
        "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false",
        "callbacks.model_checkpoint.every_n_train_steps=2",
        "callbacks.model_checkpoint.save_top_k=-1",
        "callbacks.ema.decay=0.5",
        "auto_resume=true",
    ]
    if processes == 1:
        return [*common, "data.batch_size=16", "data.num_workers=1", "data.shuffle_buffer=32"]
    return [*common, "strategy=ddp", f"trainer.devices={processes}", "data.batch_size=8", "data.num_workers=0"]


def launch(overrides: list[str], cwd: Path, torchrun: bool) -> tuple[int, str]:
    argv, env = cli_command("lf-train", *overrides, cwd=cwd, env={**FAULTS_ENV, **TORCHRUN_ENV})
    if torchrun:
        argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                "--max-restarts=2", "-m", "trainer.cli.train", *argv[1:]]  # fmt: skip
    result = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=1800)
    return result.returncode, result.stdout + result.stderr


def scenarios(latents: Path, root: Path) -> list[Scenario]:
    rng = random.Random(15)

    def signal_at(slug: str, signal: str, ranks: list[int] | None = None) -> list[str]:
        params = {"ranks": ranks} if ranks else {}
        step, micro = rng.randrange(STEPS - 1), rng.randrange(2)
        marker = root / "markers" / slug
        return inject("fault", "SignalAt", marker=marker, step=step, micro=micro, signal=signal, **params)

    def once(slug: str, target: str, **params: object) -> list[str]:
        return inject("fault", target, marker=root / "markers" / slug, **params)

    validation = [
        f"distributed.timeout_s={TIMEOUT_S}",
        f"data.val_dir={latents}",
        "trainer.val_check_interval=4",
        "+trainer.check_val_every_n_epoch=null",
        "+trainer.limit_val_batches=2",
        "callbacks=with_validation_images",
        "callbacks.validation_images._target_=tests.integration.faults.SlowValidationImages",
        f"+callbacks.validation_images.marker={root / 'markers' / 'torchrun-slow-images'}",
        f"+callbacks.validation_images.extra_s={TIMEOUT_S + 5}",
        "callbacks.validation_images.prompts=[a handwritten digit one]",
        "callbacks.validation_images.every_n_steps=2",
        "callbacks.validation_images.images_per_prompt=1",
        "callbacks.validation_images.steps=2",
    ]
    return [
        Scenario("SIGTERM", "sigterm", 1, signal_at("sigterm", "SIGTERM")),
        Scenario("SIGUSR1", "sigusr1", 1, signal_at("sigusr1", "SIGUSR1")),
        Scenario("SIGKILL", "sigkill", 1, once("sigkill", "KillAt", step=3)),
        Scenario("ENOSPC mid-checkpoint", "enospc", 1, once("enospc", "FullDiskAt", step=4)),
        Scenario("loader worker OOM-killed", "oom", 1, once("oom", "KillLoaderWorkersAt", step=3)),
        Scenario("DDP, SIGTERM to rank 1", "ddp-sigterm", 1, signal_at("ddp-sigterm", "SIGTERM", [1]), 2),
        Scenario(
            "torchrun, rank 1 SIGKILLed then hung",
            "torchrun",
            2,
            [
                *validation,
                *inject("kill", "KillAt", marker=root / "markers" / "torchrun-kill", step=2, ranks=[1]),
                *inject(
                    "stall",
                    "StallValidation",
                    marker=root / "markers" / "torchrun-stall",
                    step=4,
                    seconds=3600,
                    ranks=[1],
                ),
            ],
            2,
            torchrun=True,
        ),
    ]


def compare(final: Path, reference: Path) -> tuple[int, int]:
    """(steps lost, samples lost) of ``final`` against ``reference`` (zeros when bit-identical)."""
    a, b = load_checkpoint(final), load_checkpoint(reference)
    steps = abs(b["global_step"] - a["global_step"])
    samples = abs(b["LatentShardDataModule"]["samples"] - a["LatentShardDataModule"]["samples"])
    try:
        assert_resume_is_exact(final, reference)
    except AssertionError:
        steps = max(steps, 1)
    return steps, samples


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="lf-faults-") as tmp:
        root = Path(tmp)
        latents = make_data(root / "data")
        references = {}
        for processes in (1, 2):
            out = root / f"reference-{processes}"
            status, output = launch(base(latents, out, processes), root, torchrun=False)
            assert status == 0, output[-3000:]
            references[processes] = out / "checkpoints" / "last.ckpt"
        lost_steps = lost_samples = recovered = injected = 0
        rows = []
        for scenario in scenarios(latents, root):
            out = root / scenario.slug
            overrides = [*base(latents, out, scenario.processes), *scenario.extra]
            start, output = time.monotonic(), ""
            for _ in range(4):  # the first run meets the fault; the same command again, as a requeue does
                status, text = launch(overrides, root, scenario.torchrun)
                scenario.statuses.append(status)
                output += text
                if status == 0:
                    break
            scenario.seconds = time.monotonic() - start
            injected += scenario.faults
            steps, samples = compare(out / "checkpoints" / "last.ckpt", references[scenario.processes])
            if scenario.statuses[-1] == 0 and (steps, samples) == (0, 0):
                recovered += scenario.faults
            lost_steps, lost_samples = lost_steps + steps, lost_samples + samples
            resumed = ", ".join(sorted(set(re.findall(r"resumed from \S+ at step (\d+)", output)), key=int)) or "-"
            identical = "yes" if (steps, samples) == (0, 0) else "NO"
            statuses = " → ".join(map(str, scenario.statuses))
            cells = [scenario.name, scenario.processes, statuses, resumed, identical, f"{scenario.seconds:.0f}"]
            rows.append("| " + " | ".join(map(str, cells)) + " |")
            print(rows[-1], flush=True)
        print("| fault | processes | exit statuses | resumed at step | identical to uninterrupted | seconds |")
        print("| --- | --- | --- | --- | --- | --- |")
        print("\n".join(rows))
        summary = f"faults injected {injected}, runs recovered {recovered}"
        print(f"{summary}, steps lost {lost_steps}, samples lost {lost_samples}")


if __name__ == "__main__":
    main()
