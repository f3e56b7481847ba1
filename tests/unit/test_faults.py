"""The fault machinery without a training run: the phase board and its meetings on an in-memory store,
preemption signal handling, the storage-failure message and auto-resume's choice."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch.distributed as dist

from lf_common.storage import write_failure
from trainer.checkpoint.resume import auto_resume_checkpoint
from trainer.faults.ranks import PeerFailedError, RankBoard, RankHangError
from trainer.faults.signals import PREEMPTED_EXIT_CODE, PreemptionSignals


def boards(timeout_s: float = 1.0, world: int = 2) -> list[RankBoard]:
    store = dist.HashStore()
    return [RankBoard(store, rank, world, timeout_s, prefix="t") for rank in range(world)]


def test_a_meeting_waits_for_the_worker_however_long_it_takes_while_it_makes_progress():
    waiter, worker = boards(timeout_s=0.5)
    worker.enter("validation images", 4, alive=True)

    def work():
        for _ in range(12):  # 1.2 s, longer than the timeout, with progress all along
            time.sleep(0.1)
            worker.progress()
        worker.meet("validation images")

    thread = threading.Thread(target=work)
    thread.start()
    waiter.meet("validation images", workers=[1])
    thread.join()
    assert waiter.phase == "setup", "the waiter is back in its phase"


def test_a_meeting_names_the_rank_that_stopped_and_its_phase():
    waiter, worker = boards(timeout_s=0.5)
    worker.enter("checkpoint save", 8)  # and nothing more from it
    with pytest.raises(RankHangError, match=r"rank 1 made no progress for \d+ s in 'checkpoint save' at step 8"):
        waiter.meet("checkpoint save", workers=[1])


def test_a_meeting_ends_with_the_failure_another_rank_reported():
    waiter, worker = boards(timeout_s=5.0)
    worker.enter("checkpoint save", 8)
    worker.report_failure("StorageError: writing step-8.ckpt failed: No space left on device")
    with pytest.raises(PeerFailedError, match=r"rank 1 failed in 'checkpoint save': StorageError: writing step-8"):
        waiter.meet("checkpoint save", workers=[1])


def test_a_signal_is_only_recorded_and_the_handlers_come_back():
    before = signal.getsignal(signal.SIGUSR1)
    signals = PreemptionSignals(["SIGTERM", "USR1"])
    signals.install()
    try:
        os.kill(os.getpid(), signal.SIGUSR1)
        assert signals.request is not None and signals.request.signal_name == "SIGUSR1"
        os.kill(os.getpid(), signal.SIGTERM)
        assert signals.request.signal_name == "SIGUSR1", "the first request counts"
    finally:
        signals.uninstall()
    assert signal.getsignal(signal.SIGUSR1) == before
    with pytest.raises(ValueError, match="not a signal name"):
        PreemptionSignals(["SIGNOPE"])


def test_an_unfinished_checkpoint_at_the_end_of_the_grace_period_exits_75_naming_it():
    code = (
        "import os, signal, time, logging; logging.basicConfig()\n"
        "from trainer.faults.signals import PreemptionSignals\n"
        "s = PreemptionSignals(['SIGTERM'], grace_period_s=0.2, describe=lambda: \"in 'checkpoint save'\")\n"
        "s.install(); os.kill(os.getpid(), signal.SIGTERM); time.sleep(30)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == PREEMPTED_EXIT_CODE
    assert "not written within preemption.grace_period_s (in 'checkpoint save')" in result.stderr
    assert "the previous checkpoint stays the newest" in result.stderr


def test_a_full_disk_message_names_path_space_and_what_is_kept(tmp_path):
    error = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    message = write_failure(tmp_path / "step-0000004.ckpt", error, 12_300_000, "step-0000002.ckpt")
    assert message.startswith(f"writing {tmp_path / 'step-0000004.ckpt'} failed: No space left on device; ")
    assert "about 12.3 MB needed" in message and f"free on {tmp_path}" in message
    assert "step-0000002.ckpt is complete and stays the newest" in message and "run the same command" in message


def test_auto_resume_starts_fresh_without_checkpoints_and_resumes_with_any(tmp_path):
    assert auto_resume_checkpoint(tmp_path / "missing") is None
    assert auto_resume_checkpoint(tmp_path) is None
    (tmp_path / "step-0000002.ckpt.partial").write_bytes(b"")
    assert auto_resume_checkpoint(tmp_path) is None, "a partial write is no checkpoint"
    (tmp_path / "step-0000002.ckpt").write_bytes(b"damaged")
    assert auto_resume_checkpoint(tmp_path) == "last", "a damaged one is resolved (or refused) with reasons"
