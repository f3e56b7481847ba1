"""This process's rank and the world size, before and after the process group is up (loader code runs in both)."""

from __future__ import annotations

import os

import torch


def rank() -> int:
    """This process's rank: the process group's when one is up, else ``RANK`` (0 when unset)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    """The number of ranks: the process group's when one is up, else ``WORLD_SIZE`` (1 when unset)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))
