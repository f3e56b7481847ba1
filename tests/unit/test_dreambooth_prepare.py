"""DreamBooth preparation's agreement between ranks: a step that fails on one rank fails on all."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch.strategies import SingleDeviceStrategy

from lf_common.errors import DataError
from trainer.dreambooth.prepare import all_ranks


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
