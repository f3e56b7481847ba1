"""Quiet by default: what every ``lf-*`` command would print at each start that tells its user nothing.

Dropped (each by its exact text; every other warning and log line stays):

* transformers' notices that torchvision is not installed (latentforge never installs it);
* Lightning's advertisement for litlogger, logged by every ``Trainer``;
* torch's deprecation of ``LeafSpec``, which Lightning (not latentforge) still uses;
* Lightning's warning that a validation loader list is empty: the data modules return ``[]`` on
  purpose when there is no validation data;
* diffusers' warning, at every ``model.to(dtype)`` (export, sampling), that the model has modules to
  keep in float32, when the list it names is empty (``[]``: there are none; a list of modules stays).

:mod:`trainer.cli` calls :func:`quiet_known_noise` when it is imported, before any command imports
transformers, diffusers or Lightning, since the notices come at import time.
"""

from __future__ import annotations

import warnings

from lf_common.log_filters import drop_log_messages
from trainer.cli.lightning_private import quiet_litlogger_tip
from trainer.cli.transformers_private import quiet_torchvision_notice


def quiet_known_noise() -> None:
    """Drop the messages listed in this module's docstring."""
    quiet_torchvision_notice()
    quiet_litlogger_tip()
    warnings.filterwarnings("ignore", r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning)
    warnings.filterwarnings("ignore", r"Total length of `list` across ranks is zero")
    drop_log_messages("diffusers.models.modeling_utils", "that should be kept in float32: []")
