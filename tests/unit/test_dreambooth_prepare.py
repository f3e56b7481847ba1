"""DreamBooth preparation's agreement between ranks (``trainer.faults.ranks.all_ranks``): a step that fails
on one rank fails on all; under a process group the ranks meet through the store, so one rank's long work
(class-image generation, encoding) never trips the process-group timeout on the others."""

from __future__ import annotations

import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from lightning.pytorch.strategies import SingleDeviceStrategy

from lf_common.errors import DataError
from trainer.faults.ranks import all_ranks

ROOT = Path(__file__).resolve().parents[2]


class OtherRankFailed(SingleDeviceStrategy):
    """A strategy whose other ranks all report a failure."""

    def reduce_boolean_decision(self, decision: bool, all: bool = True) -> bool:
        return False


def test_a_step_that_failed_anywhere_fails_every_rank():
    done = []
    all_ranks(SingleDeviceStrategy(torch.device("cpu")), "step", lambda: done.append(1))
    assert done == [1]
    with pytest.raises(DataError, match="generating class images failed on another rank; that rank's log"):
        all_ranks(OtherRankFailed(torch.device("cpu")), "generating class images", None)  # nothing to do here
    with pytest.raises(ZeroDivisionError):  # this rank's own error, as it was
        all_ranks(OtherRankFailed(torch.device("cpu")), "step", lambda: 1 / 0)


# Two ranks over gloo with a process group of 2 s timeout, under the data module's guard (board timeout 1 s):
# rank 0 "generates" for 5 s while rank 1 has nothing to do, then both pass a real collective; then rank 1
# fails while encoding and rank 0, waiting for it, stops with rank 1's message.
RANK = textwrap.dedent(
    """
    import datetime, sys, time
    import torch, torch.distributed as dist
    from trainer.faults.ranks import all_ranks
    from trainer.faults.watchdog import guarded_ranks

    rank, port = int(sys.argv[1]), sys.argv[2]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=60))  # a slow start of either process is fine
    group = dist.new_group([0, 1], timeout=datetime.timedelta(seconds=2))  # the timeout that must not trip

    class Collective:  # the strategy's collective: what the ranks would wait in without a board
        def reduce_boolean_decision(self, decision, all=True):
            flag = torch.tensor(int(decision))
            dist.all_reduce(flag, group=group)
            return int(flag) == 2

    def fail():
        raise ValueError("no space for the latents")

    with guarded_ranks(rank, 2, timeout_s=1.0):
        all_ranks(Collective(), "generating class images", (lambda: time.sleep(5)) if rank == 0 else None)
        dist.barrier(group=group)  # the group outlived the long single-rank work
        print(f"rank {rank} generated", flush=True)
        all_ranks(Collective(), "encoding", fail if rank == 1 else None, worker=1)
    """
)


def test_ranks_wait_for_long_single_rank_work_past_the_process_group_timeout_and_share_failures():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-c", RANK]
    ranks = [
        subprocess.Popen(
            [*command, str(rank), str(port)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        for rank in range(2)
    ]
    outputs = [process.communicate(timeout=120)[0] for process in ranks]
    for rank, output in enumerate(outputs):
        assert f"rank {rank} generated" in output, output[-3000:]
        assert ranks[rank].returncode != 0, "encoding failed on rank 1: no rank goes on"
        assert "rank 1 failed in 'encoding': ValueError: no space for the latents" in output or rank == 1, output
    assert "ValueError: no space for the latents" in outputs[1]
