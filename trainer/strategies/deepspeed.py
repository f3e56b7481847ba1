"""Lightning's DeepSpeed strategy, also on CPU processes (gloo), so ZeRO runs in every CI run.

Lightning's ``DeepSpeedStrategy`` refuses any accelerator but CUDA. DeepSpeed itself runs on CPU
(its CPU accelerator, the gloo backend, bf16 or fp32). On CUDA this class is Lightning's strategy
unchanged; on CPU it overrides the three places that assume CUDA:

* ``setup_environment``: skip the CUDA check (``DDPStrategy.setup_environment``);
* ``setup_distributed``: skip the CUDA device-index validation, and DeepSpeed's shared-memory
  all-reduce op, which only inference uses and which would compile for 30-60 s
  (:func:`trainer.strategies.deepspeed_private.skip_shm_comm_op`);
* ``initialize_engine`` (Lightning's private ``_setup_model_and_optimizer``): call
  ``deepspeed.initialize`` without Lightning's ``device_rank=root_device.index`` (``None`` on CPU),
  so DeepSpeed takes the local rank from ``LOCAL_RANK``, as it does under its own launcher.

The private Lightning steps go through :mod:`trainer.strategies.lightning_private`.
"""

from __future__ import annotations

from typing import Any

from lightning.fabric.utilities.seed import reset_seed
from lightning.pytorch.accelerators import CUDAAccelerator
from lightning.pytorch.strategies import DDPStrategy
from torch.nn import Module
from torch.optim import Optimizer

from trainer.strategies.deepspeed_private import skip_shm_comm_op
from trainer.strategies.lightning_private import DeepSpeedStrategyHooks


class CpuDeepSpeedStrategy(DeepSpeedStrategyHooks):
    """``lightning.pytorch.strategies.DeepSpeedStrategy`` that also runs on CPU."""

    strategy_name = "latentforge_deepspeed"

    def _on_cpu(self) -> bool:
        return not isinstance(self.accelerator, CUDAAccelerator)

    def setup_environment(self) -> None:
        if self._on_cpu():
            DDPStrategy.setup_environment(self)
        else:
            super().setup_environment()

    def setup_distributed(self) -> None:
        if self._on_cpu():
            reset_seed()
            self.set_world_ranks()
            skip_shm_comm_op()
            self.init_deepspeed_distributed()
        else:
            super().setup_distributed()

    def initialize_engine(self, model: Module, optimizer: Optimizer | None, lr_scheduler: Any = None) -> tuple:
        if not self._on_cpu():
            return super().initialize_engine(model, optimizer, lr_scheduler)
        import deepspeed

        engine, deepspeed_optimizer, _, _ = deepspeed.initialize(
            config=self.config,
            model=model,
            model_parameters=[p for p in model.parameters() if p.requires_grad],
            optimizer=optimizer,
            lr_scheduler=lr_scheduler,
            dist_init_required=False,
        )
        return engine, deepspeed_optimizer
