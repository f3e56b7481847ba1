"""diffusers' private name that :mod:`trainer.memory.activations` uses, and why no public API does the job.

``_gradient_checkpointing_func``: ``ModelMixin.enable_gradient_checkpointing`` sets it on every block that
checkpoints, and each block calls it with its function and inputs. The activation estimate runs each such call
through a counter of its own (a block's inputs held, its insides recomputed in backward); the public
``enable_gradient_checkpointing(gradient_checkpointing_func=...)`` would also switch checkpointing on where the
run has it off.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from lf_common.upstream_contract import PrivateName

ADAPTER = "trainer/memory/diffusers_private.py"
FUNC = "_gradient_checkpointing_func"


def checkpointing_function(module: torch.nn.Module) -> Callable[..., Any] | None:
    """The function ``module`` checkpoints its blocks with, if one was set on the instance."""
    return module.__dict__.get(FUNC)


def set_checkpointing_function(module: torch.nn.Module, function: Callable[..., Any] | None) -> None:
    """Make ``module`` checkpoint through ``function`` (``None``: remove the instance's own)."""
    if function is None:
        module.__dict__.pop(FUNC, None)
    else:
        setattr(module, FUNC, function)


CONTRACTS = (PrivateName("diffusers", "diffusers.models.modeling_utils.ModelMixin", FUNC, ADAPTER, kind="source"),)
