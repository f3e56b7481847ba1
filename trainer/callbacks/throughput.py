"""Throughput and MFU: Lightning's ``ThroughputMonitor`` with the UNet's FLOPs counted once.

Lightning's monitor logs, every ``trainer.log_every_n_steps`` and over a window of
``window_size`` batches, ``train/samples_per_sec`` (images/s over all ranks),
``train/device/samples_per_sec``, ``train/samples`` (samples seen), ``train/flops_per_sec`` and,
when the device's peak is known, ``train/device/mfu`` (model FLOPs utilisation). It reads the
FLOPs of one training batch from the module's ``flops_per_batch``; this callback fills that in on
the first training batch: the forward and backward FLOPs of the UNet at that batch's shapes,
counted once with ``torch.utils.flop_counter.FlopCounterMode`` (through Lightning's
``measure_flops``) on a meta-device copy, so nothing is computed or allocated. Recomputation by
gradient checkpointing is not counted (MFU counts the model's FLOPs, as PaLM's appendix B does).

Lightning knows the peak FLOP/s of common GPUs (per dtype); elsewhere, or to override it, give
``available_flops`` (peak FLOP/s of one device), and MFU is logged too.
"""

from __future__ import annotations

import logging
from typing import Any

import lightning as L
import torch
from diffusers import UNet2DConditionModel
from lightning.fabric.utilities.throughput import measure_flops
from lightning.pytorch.callbacks import ThroughputMonitor

from trainer.callbacks.lightning_private import stage_throughputs
from trainer.diffusion.unet_kinds import SDXL_TIME_IDS, sdxl_pooled_width
from trainer.faults.ranks import single_rank_work

log = logging.getLogger(__name__)


def unet_train_flops(unet_config: dict[str, Any], latents: torch.Size, text: torch.Size) -> int:
    """FLOPs of one forward and backward pass of a UNet on a batch of these shapes.

    Args:
        unet_config: the ``UNet2DConditionModel`` config.
        latents: the batch's latent shape ``(B, C, h, w)``.
        text: the batch's text-embedding shape ``(B, T, D)``.
    """
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(unet_config)
        x = torch.empty(latents[0], unet_config["in_channels"], *latents[2:])  # (B, C_in, h, w): 9 when inpainting
        timesteps = torch.zeros(latents[0], dtype=torch.long)  # (B,)
        context = torch.empty(*text)  # (B, T, D)
        added = None
        if (pooled := sdxl_pooled_width(unet_config)) is not None:  # SDXL: pooled (B, P) and time_ids (B, 6)
            added = {"text_embeds": torch.empty(latents[0], pooled), "time_ids": torch.zeros(latents[0], SDXL_TIME_IDS)}
    return measure_flops(
        unet,
        lambda: unet(x, timesteps, encoder_hidden_states=context, added_cond_kwargs=added).sample,
        lambda y: y.sum(),
    )


def text_shape(trainer: L.Trainer, batch_size: int) -> tuple[int, ...]:
    """``(B, T, D)`` of the text the UNet attends to, for a batch that holds none (``data.skip_text``: the step
    encodes the token ids): the shape of the data's empty caption ``(T, D)``, which the step's text shares."""
    return (batch_size, *trainer.datamodule.uncond_text.shape)


class UNetThroughputMonitor(ThroughputMonitor):
    """``ThroughputMonitor`` that counts the UNet's FLOPs per batch and logs MFU.

    Args:
        batch_size_fn: samples in a batch.
        available_flops: peak FLOP/s of one device, for MFU where Lightning does not know it
            (CPUs, new GPUs); ``None`` keeps Lightning's value.
        **kwargs: ``ThroughputMonitor``'s (``window_size``, ``separator``, ...).
    """

    def __init__(self, batch_size_fn: Any, available_flops: float | None = None, **kwargs: Any) -> None:
        super().__init__(batch_size_fn, **kwargs)
        self.peak_flops = available_flops

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if self.peak_flops is not None:
            self.available_flops = int(self.peak_flops)
            for throughput in stage_throughputs(self):
                throughput.available_flops = self.available_flops

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, idx: int) -> None:
        if getattr(pl_module, "flops_per_batch", None) is None and "latents" in batch:
            with single_rank_work("FLOP count", trainer.global_step, worker=None):  # ranks meet outside the PG timeout
                text = batch["text"].shape if "text" in batch else text_shape(trainer, batch["latents"].shape[0])
                flops = unet_train_flops(dict(pl_module.unet.config), batch["latents"].shape, text)
            pl_module.flops_per_batch = flops
            if trainer.is_global_zero:
                log.info("UNet forward+backward: %.3g FLOPs per batch of %d", flops, batch["latents"].shape[0])
