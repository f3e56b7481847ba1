"""Lightning's FSDP strategy, also on CPU processes (gloo).

Lightning wraps the model with ``device_id=root_device.index``, which is ``None`` on CPU, and FSDP
then moves the shards to the current CUDA device. On CPU this class wraps the model itself with
``device_id=torch.device("cpu")``; Lightning sees an already wrapped model and only adds what it
adds after wrapping (activation checkpointing).
"""

from __future__ import annotations

import torch
from lightning.pytorch.accelerators import CUDAAccelerator
from lightning.pytorch.strategies import FSDPStrategy as LightningFSDPStrategy
from torch.nn import Module


class FSDPStrategy(LightningFSDPStrategy):
    """``lightning.pytorch.strategies.FSDPStrategy`` that also runs on CPU."""

    strategy_name = "latentforge_fsdp"

    def _setup_model(self, model: Module) -> Module:
        from torch.distributed.fsdp import FullyShardedDataParallel

        on_cpu = not isinstance(self.accelerator, CUDAAccelerator)
        if on_cpu and not any(isinstance(m, FullyShardedDataParallel) for m in model.modules()):
            model = FullyShardedDataParallel(
                module=model,
                cpu_offload=self.cpu_offload,
                mixed_precision=self.mixed_precision_config,
                sharding_strategy=self.sharding_strategy,
                device_id=torch.device("cpu"),
                **self.kwargs,
            )
        return super()._setup_model(model)
