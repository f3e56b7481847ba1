"""Quiet by default: what every ``lf-*`` command would print at each start that tells its user nothing.

Dropped (each by its exact text; every other warning and log line stays):

* transformers' notices that torchvision is not installed (latentforge never installs it);
* Lightning's advertisement for litlogger, logged by every ``Trainer``;
* torch's deprecation of ``LeafSpec``, which Lightning (not latentforge) still uses;
* Lightning's warning that a validation loader list is empty: the data modules return ``[]`` on
  purpose when there is no validation data;
* diffusers' warning, at every ``model.to(dtype)`` (export, sampling), that the model has modules to
  keep in float32, when the list it names is empty (``[]``: there are none; a list of modules stays).

Every command's ``main`` calls :func:`quiet_import_noise` before its job imports transformers,
diffusers or Lightning (those notices come at import time); :func:`quiet_known_noise` adds Lightning's
tip, logged when a ``Trainer`` is built, and is called just before one is (it imports Lightning).
"""

from __future__ import annotations

import warnings

from lf_common.log_filters import drop_log_messages
from trainer.cli.transformers_private import quiet_torchvision_notice


def quiet_known_noise() -> None:
    """Drop the messages listed in this module's docstring (imports Lightning: call it when the job runs)."""
    from trainer.cli.lightning_private import quiet_litlogger_tip

    quiet_import_noise()
    quiet_litlogger_tip()


def quiet_import_noise() -> None:
    """Drop the messages of this module's docstring that need no Lightning to name (cheap; idempotent)."""
    quiet_torchvision_notice()
    warnings.filterwarnings("ignore", r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning)
    warnings.filterwarnings("ignore", r"Total length of `list` across ranks is zero")
    drop_log_messages("diffusers.models.modeling_utils", "that should be kept in float32: []")
