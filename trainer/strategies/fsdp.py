"""Lightning's FSDP strategy, also on CPU processes (gloo).

On CPU, two things of Lightning's strategy assume CUDA:

* it wraps the model with ``device_id=root_device.index``, which is ``None`` on CPU (FSDP then
  moves the shards to the current CUDA device): this class wraps the model itself with
  ``device_id=torch.device("cpu")``, and Lightning, seeing a wrapped model, only adds what it adds
  after wrapping (activation checkpointing);
* full state dicts are gathered with ``offload_to_cpu=True``, which crashes (a segmentation fault
  in FSDP's state-dict hook) when the parameters already live on the CPU: here the model and
  optimizer state dicts are gathered to rank 0 without offloading.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.accelerators import CUDAAccelerator
from lightning.pytorch.core.optimizer import LightningOptimizer
from lightning.pytorch.strategies import FSDPStrategy as LightningFSDPStrategy
from torch.nn import Module
from torch.optim import Optimizer


class FSDPStrategy(LightningFSDPStrategy):
    """``lightning.pytorch.strategies.FSDPStrategy`` that also runs on CPU."""

    strategy_name = "latentforge_fsdp"

    def _on_cpu(self) -> bool:
        return not isinstance(self.accelerator, CUDAAccelerator)

    def _setup_model(self, model: Module) -> Module:
        from torch.distributed.fsdp import FullyShardedDataParallel

        if self._on_cpu() and not any(isinstance(m, FullyShardedDataParallel) for m in model.modules()):
            model = FullyShardedDataParallel(
                module=model,
                cpu_offload=self.cpu_offload,
                mixed_precision=self.mixed_precision_config,
                sharding_strategy=self.sharding_strategy,
                device_id=torch.device("cpu"),
                **self.kwargs,
            )
        return super()._setup_model(model)

    def _full_state_on_cpu(self) -> bool:
        return self._on_cpu() and self._state_dict_type == "full" and self.model is not None

    def _full_state_dict_context(self) -> Any:
        from torch.distributed.fsdp import FullOptimStateDictConfig, FullStateDictConfig, StateDictType
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        return FSDP.state_dict_type(
            module=self.model,
            state_dict_type=StateDictType.FULL_STATE_DICT,
            state_dict_config=FullStateDictConfig(offload_to_cpu=False, rank0_only=True),
            optim_state_dict_config=FullOptimStateDictConfig(offload_to_cpu=False, rank0_only=True),
        )

    def lightning_module_state_dict(self) -> dict[str, Any]:
        if not self._full_state_on_cpu():
            return super().lightning_module_state_dict()
        with self._full_state_dict_context():
            return self.model.state_dict()

    def optimizer_state(self, optimizer: Optimizer) -> dict[str, Any]:
        if not self._full_state_on_cpu():
            return super().optimizer_state(optimizer)
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        from torch.distributed.fsdp import OptimStateKeyType

        if isinstance(optimizer, LightningOptimizer):
            optimizer = optimizer._optimizer
        with self._full_state_dict_context():
            state = FSDP.optim_state_dict(self.model, optimizer)
            if self.global_rank == 0:
                state = FSDP.rekey_optim_state_dict(state, OptimStateKeyType.PARAM_ID, self.model)
            return state
