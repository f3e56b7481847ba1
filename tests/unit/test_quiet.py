"""Quiet by default: the known noise of upstream libraries is dropped, their other warnings stay."""

from __future__ import annotations

import logging

import pytest

from trainer.cli.lightning_private import LITLOGGER_TIP
from trainer.cli.quiet import quiet_known_noise
from trainer.cli.transformers_private import IMPORT_UTILS, TORCHVISION_NOTICE

NOISE = {  # the logger that emits each, and its text as upstream writes it (the contract tests check the texts)
    IMPORT_UTILS: f"CLIPImageProcessor {TORCHVISION_NOTICE}; falling back to CLIPImageProcessorPil",
    "lightning.pytorch.utilities.rank_zero": f"💡 Tip: For seamless cloud logging, {LITLOGGER_TIP}",
    "diffusers.models.modeling_utils": "There are modules in UNet2DConditionModel that should be kept in float32: [].",
}


class _Kept(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.mark.parametrize("logger_name", list(NOISE))
def test_known_noise_is_dropped_and_other_warnings_stay(logger_name):
    quiet_known_noise()
    logger, kept = logging.getLogger(logger_name), _Kept()
    logger.addHandler(kept)
    try:
        logger.warning(NOISE[logger_name])
        logger.warning("a warning that matters: modules to keep in float32: ['conv_in']")
    finally:
        logger.removeHandler(kept)
    assert kept.messages == ["a warning that matters: modules to keep in float32: ['conv_in']"]
