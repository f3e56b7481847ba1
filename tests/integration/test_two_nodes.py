"""Two machines simulated on one: two ``torchrun`` launches (``--nnodes=2 --nproc-per-node=1``, one per
node rank, a static rendezvous on 127.0.0.1) train on CPU with checkpoints in a bucket, each node with an
``output_dir`` of its own, so neither sees the other's ``checkpoint-staging`` (as separate machines).
ZeRO-2: node 1's local rank 0 uploads node 1's optimizer partition, rank 0 uploads the ``latest`` tag
after both. FSDP (full state dict): rank 0 uploads the one file. Both nodes resume from the bucket, each
downloading to its own ``checkpoint-cache`` and loading its own copy (Lightning's loads take rank 0's
path, which on separate machines is not there: ``own_path_broadcast``, unit-tested, since here one disk
holds both).
"""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lf_common import object_store
from tests.integration.cli import cli_command
from tests.integration.test_distributed import TORCHRUN_ENV, two_process_overrides
from tests.s3_server import upload_times
from trainer.checkpoint.reading import load_checkpoint
from trainer.checkpoint.resume import TAG_FILE, resolve_resume_checkpoint

pytestmark = [pytest.mark.slow, pytest.mark.dist]

NODES = 2
PARTITIONS = {f"checkpoint/zero_pp_rank_{rank}_mp_rank_00_optim_states.pt" for rank in range(NODES)}
MODEL_STATES = "checkpoint/mp_rank_00_model_states.pt"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def node_overrides(latent_dir: Path, out: Path, strategy: str, steps: int) -> list[str]:
    """:func:`two_process_overrides` for ``strategy``, one process on each of two nodes."""
    overrides = [o for o in two_process_overrides(latent_dir, out, strategy, steps) if "devices=" not in o]
    return [*overrides, "trainer.devices=1", f"trainer.num_nodes={NODES}"]


def run_nodes(latent_dir: Path, root: Path, strategy: str, steps: int, *extra: str, timeout: int = 300) -> list[str]:
    """Start both nodes' ``torchrun`` at once (node ``n`` in ``root/node<n>``, its ``output_dir`` ``run`` there)
    and wait for both; each node's output. A node that fails or outlives ``timeout`` has both killed, and the
    assertion shows both nodes' output."""
    port, processes, logs = free_port(), [], []
    try:
        for node in range(NODES):
            cwd = root / f"node{node}"
            cwd.mkdir(parents=True, exist_ok=True)
            argv, env = cli_command(
                "lf-train", *node_overrides(latent_dir, cwd / "run", strategy, steps), *extra, cwd=cwd
            )
            torchrun = [
                sys.executable, "-m", "torch.distributed.run", f"--nnodes={NODES}", "--nproc-per-node=1",
                f"--node-rank={node}", "--master-addr=127.0.0.1", f"--master-port={port}",
            ]  # fmt: skip
            log = (cwd / f"torchrun-{steps}.log").open("w")
            logs.append(log)
            command = [*torchrun, "-m", "trainer.cli.train", *argv[1:]]
            processes.append(
                subprocess.Popen(
                    command,
                    cwd=cwd,
                    env={**env, **TORCHRUN_ENV},
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
        deadline = time.monotonic() + timeout  # an upper bound for a hang, not a timing
        while any(p.poll() is None for p in processes) and time.monotonic() < deadline:
            if any(p.poll() not in (None, 0) for p in processes):
                break  # one node failed: the other would wait for it
            time.sleep(0.2)
    finally:
        codes = [p.poll() for p in processes]
        for process in processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        for log in logs:
            log.close()
    outputs = [(root / f"node{node}" / f"torchrun-{steps}.log").read_text() for node in range(NODES)]
    shown = "\n".join(f"--- node {node} (exit {codes[node]}) ---\n{out[-3000:]}" for node, out in enumerate(outputs))
    assert codes == [0] * NODES, shown
    return outputs


def assert_complete(url: str, strategy: str) -> None:
    """``url`` is a complete checkpoint: for FSDP one object; for ZeRO a folder with the model states, both
    nodes' optimizer partitions, and its ``latest`` tag, uploaded after every other file."""
    if strategy == "fsdp":
        assert set(object_store.object_infos(url)) == {""}, f"{url}: one object"
        return
    files = set(object_store.object_infos(url))
    assert {TAG_FILE, MODEL_STATES, *PARTITIONS} <= files, f"{url}: {sorted(files)}"
    uploaded = upload_times(url)
    assert all(uploaded[TAG_FILE] >= uploaded[name] for name in files), f"{url}: the tag is uploaded last"


@pytest.mark.parametrize("strategy", ["deepspeed_stage_2", "fsdp"])
def test_two_nodes_upload_every_partition_to_a_bucket_and_resume_from_it(latent_dir, tmp_path, s3_bucket, strategy):
    checkpoints = f"{s3_bucket}/run/checkpoints"
    bucket = f"callbacks.model_checkpoint.dirpath={checkpoints}"
    runs = [tmp_path / f"node{node}" / "run" for node in range(NODES)]

    run_nodes(latent_dir, tmp_path, strategy, 2, bucket)
    names = {object_store.basename(entry["url"]) for entry in object_store.list_entries(checkpoints)}
    assert names == {"step-0000002.ckpt", "last.ckpt"}
    for name in names:
        assert_complete(f"{checkpoints}/{name}", strategy)
    for run in runs:
        staging = run / "checkpoint-staging"  # ZeRO: each node staged its part; FSDP's one file: node 0 only
        assert staging.is_dir() == (strategy != "fsdp" or run == runs[0]), run
        assert not staging.is_dir() or not list(staging.iterdir()), run
        assert not (run / "checkpoints").exists(), run

    outputs = run_nodes(latent_dir, tmp_path, strategy, 4, bucket, "ckpt_path=last")
    assert "resumed from" in outputs[0] and "at step 2" in outputs[0]
    for output in outputs:
        assert f"resume: from {checkpoints}/last.ckpt" in output, output[-3000:]
    for run in runs:
        assert (run / "checkpoint-cache").is_dir(), f"{run}: the node downloaded its own copy"
        assert list((run / "checkpoint-cache").iterdir()) == [], f"{run}: the resumed copy is removed"
        assert not (run / "checkpoint-staging").is_dir() or not list((run / "checkpoint-staging").iterdir()), run
    names = {object_store.basename(entry["url"]) for entry in object_store.list_entries(checkpoints)}
    assert names == {"step-0000002.ckpt", "step-0000004.ckpt", "last.ckpt"}
    for name in names:
        assert_complete(f"{checkpoints}/{name}", strategy)
    last = resolve_resume_checkpoint("last", checkpoints, tmp_path / "cache")
    assert load_checkpoint(last)["global_step"] == 4
