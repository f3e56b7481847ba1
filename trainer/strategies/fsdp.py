"""Lightning's FSDP strategy, also on CPU processes (gloo).

On CPU, two things of Lightning's strategy assume CUDA:

* it wraps the model with ``device_id=root_device.index``, which is ``None`` on CPU (FSDP then
  moves the shards to the current CUDA device): this class wraps the model itself with
  ``device_id=torch.device("cpu")``, and Lightning, seeing a wrapped model, only adds what it adds
  after wrapping (activation checkpointing);
* full state dicts are gathered with ``offload_to_cpu=True``, which crashes (a segmentation fault
  in FSDP's state-dict hook) when the parameters already live on the CPU: here the model and
  optimizer state dicts are gathered to rank 0 without offloading.

Everywhere: a resume reads each rank's own copy of the checkpoint (Lightning's load takes rank 0's
path, which on another machine with another ``output_dir`` is not there), and sharded checkpoints
(``state_dict_type=sharded``) are refused: resume, export and the sampler read full ones (one file).

The private Lightning step (model wrapping) goes through :mod:`trainer.strategies.lightning_private`.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from lightning.pytorch.accelerators import CUDAAccelerator
from lightning.pytorch.core.optimizer import LightningOptimizer
from torch.nn import Module
from torch.optim import Optimizer

from lf_common.errors import ConfigError
from trainer.strategies.lightning_private import FSDPStrategyHooks, own_path_broadcast


class CpuFSDPStrategy(FSDPStrategyHooks):
    """``lightning.pytorch.strategies.FSDPStrategy`` that also runs on CPU.

    Args:
        state_dict_type: ``"full"`` checkpoints (one file, gathered on rank 0); ``"sharded"`` is refused.
        *args, **kwargs: ``FSDPStrategy``'s other arguments.

    Raises:
        ConfigError: ``state_dict_type="sharded"``.
    """

    strategy_name = "latentforge_fsdp"

    def __init__(self, *args: Any, state_dict_type: Literal["full", "sharded"] = "full", **kwargs: Any) -> None:
        if state_dict_type != "full":
            raise ConfigError(
                f"trainer.strategy.state_dict_type={state_dict_type}: resume, lf-export and lf-sample read full FSDP "
                "checkpoints (one file) only; use trainer.strategy.state_dict_type=full, or strategy=deepspeed_stage_3 "
                "for checkpoints sharded across ranks"
            )
        super().__init__(*args, state_dict_type=state_dict_type, **kwargs)
        self.state_dict_type = state_dict_type

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        """Lightning's, each rank reading its own ``checkpoint_path`` (its machine's copy), not rank 0's."""
        with own_path_broadcast(self, checkpoint_path):
            return super().load_checkpoint(checkpoint_path, weights_only)

    def _on_cpu(self) -> bool:
        return not isinstance(self.accelerator, CUDAAccelerator)

    def wrap_model(self, model: Module) -> Module:
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
        return super().wrap_model(model)

    def _full_state_on_cpu(self) -> bool:
        return self._on_cpu() and self.state_dict_type == "full" and self.model is not None

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
            optimizer = optimizer.optimizer
        with self._full_state_dict_context():
            state = FSDP.optim_state_dict(self.model, optimizer)
            if self.global_rank == 0:
                state = FSDP.rekey_optim_state_dict(state, OptimStateKeyType.PARAM_ID, self.model)
            return state
