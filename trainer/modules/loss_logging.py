"""The training loss broken down for the logs: per range of timesteps and per dataset of ``data=mixed``.

Each takes the objective's unweighted per-sample errors (:class:`~trainer.diffusion.objective.LossTerms`)
and returns ``{metric name: mean error}`` for the groups present in the batch, for ``LightningModule.log_dict``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from trainer.diffusion.objective import LossTerms


def loss_by_timestep_bucket(terms: LossTerms, num_train_timesteps: int, buckets: int) -> dict[str, torch.Tensor]:
    """Unweighted loss per ``buckets`` ranges of the schedule: ``train/loss_t000-249`` etc. (the ranges this batch
    hit, ``terms.timesteps`` ``(B,)``)."""
    width = -(-num_train_timesteps // buckets)
    bucket = terms.timesteps // width
    return {
        f"train/loss_t{b * width:03d}-{min(num_train_timesteps, (b + 1) * width) - 1:03d}": terms.errors[
            bucket == b
        ].mean()
        for b in bucket.unique().tolist()
    }


def loss_by_dataset(terms: LossTerms, index: torch.Tensor, names: Sequence[str]) -> dict[str, torch.Tensor]:
    """Unweighted loss per dataset of ``data=mixed`` (``index`` ``(B,)`` into ``names``): ``train/loss_<name>``
    for the datasets in this batch."""
    index = index.to(terms.errors.device)
    return {f"train/loss_{names[i]}": terms.errors[index == i].mean() for i in index.unique().tolist()}


def gradient_norm(parameters: Iterable[torch.nn.Parameter]) -> torch.Tensor | None:
    """The global L2 norm of the gradients of ``parameters`` (float32), or ``None`` when none has one."""
    norms = [p.grad.detach().float().norm() for p in parameters if p.grad is not None]
    return torch.stack(norms).norm() if norms else None
