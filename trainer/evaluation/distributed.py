"""Split an evaluation across the ranks of a process group and gather it back in order.

Item ``i`` of ``N`` goes to rank ``i % world`` as its slot ``i // world``; every rank gets the same
number of slots, ``ceil(N / world)``, the last ones padded with a repeat of a real item (whose
result is dropped). Equal work means no rank waits long at the gather for another (the process
group's timeout is never near), and under ZeRO-3 every rank runs the same number of forward passes.
Gathered rows are put back in item order, so the result does not depend on the number of ranks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist


def rank_and_world() -> tuple[int, int]:
    """This process's rank and the world size of the default process group (``(0, 1)`` without one)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _collective_device() -> torch.device:
    """Where the default group's collectives take tensors: this process's GPU under NCCL, else the CPU."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def gather_rows(local: torch.Tensor, total: int) -> torch.Tensor:
    """All ranks' ``(slots, ...)`` rows (rank ``r`` slot ``s`` holding item ``s * world + r``) as
    ``(total, ...)`` in item order, on every rank.

    ``local`` may hold fewer than ``ceil(total / world)`` rows (a rank with fewer items); it is
    padded here. The result is on ``local``'s device. Every rank must call this (it is a collective).
    """
    rank, world = rank_and_world()
    slots = math.ceil(total / world)
    if len(local) > slots:
        raise ValueError(f"rank {rank} holds {len(local)} rows, more than its {slots} slots of {total} items")
    if len(local) < slots:
        local = torch.cat([local, local.new_zeros((slots - len(local), *local.shape[1:]))])
    if world == 1:
        return local[:total]
    sent = local.to(_collective_device()).contiguous()
    gathered = [torch.empty_like(sent) for _ in range(world)]
    dist.all_gather(gathered, sent)
    stacked = torch.stack(gathered, dim=1)  # (slots, world, ...): slot s, rank r is item s * world + r
    return stacked.reshape(slots * world, *local.shape[1:])[:total].to(local.device)


def all_reduce_sum(value: torch.Tensor) -> torch.Tensor:
    """``value`` summed over all ranks (itself without a process group)."""
    if rank_and_world()[1] > 1:
        summed = value.to(_collective_device()).clone()
        dist.all_reduce(summed)
        return summed.to(value.device)
    return value


@dataclass(frozen=True)
class RankShare:
    """This rank's share of ``total`` items.

    Attributes:
        total: the number of items.
        rank: this process's rank.
        world: the number of ranks.
    """

    total: int
    rank: int = 0
    world: int = 1

    @classmethod
    def current(cls, total: int) -> RankShare:
        """The share of this process in the default process group."""
        rank, world = rank_and_world()
        return cls(total, rank, world)

    @property
    def slots(self) -> int:
        """Items per rank, padding included: ``ceil(total / world)``."""
        return math.ceil(self.total / self.world)

    @property
    def indices(self) -> list[int]:
        """The item of each slot (padding slots repeat the last item)."""
        return [min(slot * self.world + self.rank, self.total - 1) for slot in range(self.slots)]

    @property
    def valid(self) -> list[bool]:
        """Whether each slot is a real item (not padding)."""
        return [slot * self.world + self.rank < self.total for slot in range(self.slots)]
