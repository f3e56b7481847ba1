"""The memory plan of a training run: bytes per rank for each part, from parameter shapes alone.

Pure arithmetic (no torch): :class:`ModelTensors` is what the plan needs to know of the module (the shapes of
the trained tensors, the count of the frozen ones), :class:`RunSetup` the run's precision,
strategy, optimizer and EMA; :func:`memory_plan` gives each part's bytes on one rank.

The parts, per rank (Ψ: the trained parameters, N: the ranks a strategy shards over):

* **weights**: every parameter, trained or frozen, in the weights' dtype (4 bytes under ``32-true`` and
  ``*-mixed``, whose autocast keeps float32 weights; 2 under ``*-true`` and DeepSpeed's bf16/fp16, which casts
  the module). ZeRO-3 and FSDP shard them: /N.
* **gradients**: the trained parameters only (LoRA: the adapters), in the weights' dtype; ZeRO-2/3 and FSDP: /N.
* **master weights**: DeepSpeed's float32 copy of the trained parameters (4Ψ), sharded from ZeRO-1 on (/N);
  elsewhere the weights are their own master (``*-mixed`` keeps them float32).
* **optimizer state**: each optimizer's own state tensors (:func:`optimizer_state_bytes`), in the dtype of the
  tensors it steps (DeepSpeed: the float32 master); ZeRO-1/2/3 and FSDP: /N. With ZeRO-Offload it and the
  master weights live in host memory.
* **EMA**: the callback's float32 copy of the trained parameters (4Ψ: a LoRA run's adapters, not its frozen
  base), on the training device (in host memory with ``callbacks.ema.device=cpu``), never sharded
  (:mod:`trainer.callbacks.ema`).
* **activations**: given (:mod:`trainer.memory.activations` estimates them on the meta device).

These are the ZeRO paper's model-state formulas (Rajbhandari et al. 2020, "ZeRO: Memory Optimizations Toward
Training Trillion Parameter Models", sec. 3 and 5: mixed-precision Adam holds 2Ψ + 2Ψ + 12Ψ bytes; stage 1
divides the 12Ψ by N, stage 2 also the gradients' 2Ψ, stage 3 all 16Ψ), as DeepSpeed's memory page states them
(``estimate_zero2_model_states_mem_needs``, https://deepspeed.readthedocs.io/en/latest/memory.html), with each
optimizer's actual state in place of Adam's 8Ψ and every frozen weight counted.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

GIB = 1024**3
FLOAT32 = 4
ADAM_STEP_BYTES = 4  # torch's Adam/AdamW keep ``step`` as a float32 0-d tensor per parameter
BNB_BLOCK = 256  # bitsandbytes' block-wise 8-bit optimizers: one float32 absmax per 256 elements
BNB_QMAP_BYTES = 2 * 256 * FLOAT32  # the two quantization maps (256 float32 each), shared by all tensors
HALF_PRECISIONS = ("bf16-true", "16-true")
OPTIMIZER_FAMILIES = ("torch", "bitsandbytes", "adafactor", "prodigy", "lion", "schedule_free", "other")


@dataclass(frozen=True)
class ModelTensors:
    """What the plan knows of the module: the trained tensors' shapes and the frozen parameters.

    Attributes:
        trainable: the shape of each trained parameter (the UNet's, its LoRA adapters', a trained text
            encoder's), in the optimizer's order.
        frozen_numel: elements of the parameters that do not train (a LoRA base, a frozen block).
    """

    trainable: tuple[tuple[int, ...], ...]
    frozen_numel: int = 0

    @property
    def trainable_numel(self) -> int:
        """Elements of the trained parameters (Ψ)."""
        return sum(math.prod(shape) for shape in self.trainable)

    @property
    def numel(self) -> int:
        """Elements of all parameters."""
        return self.trainable_numel + self.frozen_numel


@dataclass(frozen=True)
class OptimizerSetup:
    """The optimizer as the plan sees it.

    Attributes:
        family: :func:`trainer.strategies.optimizer_support.optimizer_family` of ``optim._target_``.
        first_moment: Adafactor with ``beta1`` set, Prodigy with ``betas[0] > 0``: keeps a first moment.
        min_8bit_size: bitsandbytes: tensors with fewer elements keep 32-bit moments.
    """

    family: str = "torch"
    first_moment: bool = True
    min_8bit_size: int = 4096


@dataclass(frozen=True)
class RunSetup:
    """The run's settings that decide memory.

    Attributes:
        precision: Lightning's spelling (``32-true``, ``bf16-mixed``, ``bf16-true``, ``16-mixed``, ``16-true``).
        strategy: ``single``, ``ddp``, ``fsdp`` or ``deepspeed``.
        world_size: the ranks a sharding strategy divides over (devices x nodes).
        zero_stage: DeepSpeed's ZeRO stage (0-3).
        offload_optimizer: ZeRO-Offload: the optimizer state and master weights in host memory.
        optimizer: the optimizer.
        ema: the EMA callback is on.
        ema_on_host: it keeps its average in host memory (``callbacks.ema.device=cpu``).
    """

    precision: str = "32-true"
    strategy: str = "single"
    world_size: int = 1
    zero_stage: int = 0
    offload_optimizer: bool = False
    optimizer: OptimizerSetup = field(default_factory=OptimizerSetup)
    ema: bool = False
    ema_on_host: bool = False


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes per rank of each part; ``host`` holds what ZeRO-Offload (and an EMA on the host) keeps in host memory.

    Attributes:
        parts: part name to bytes on the training device, in the table's order.
        host: part name to bytes in host memory.
        trainable_numel, numel: the trained and all parameters' elements.
    """

    parts: dict[str, int]
    host: dict[str, int]
    trainable_numel: int
    numel: int

    @property
    def total(self) -> int:
        """Bytes on the device, all parts."""
        return sum(self.parts.values())


def weight_bytes(precision: str, strategy: str) -> int:
    """Bytes per weight element: 2 when the module itself is cast to half precision (``bf16-true``,
    ``16-true``, or DeepSpeed with any 16-bit precision), else 4."""
    if precision in HALF_PRECISIONS or (strategy == "deepspeed" and precision.startswith(("bf16", "16"))):
        return 2
    return FLOAT32


def optimizer_state_bytes(shapes: Sequence[tuple[int, ...]], optimizer: OptimizerSetup, element_bytes: int) -> int:
    """Bytes of the optimizer's state for parameters of these shapes, as each library allocates it.

    Args:
        shapes: the shapes of the tensors the optimizer steps.
        optimizer: the optimizer.
        element_bytes: bytes per element of those tensors (the state follows their dtype where the library does).

    * ``torch`` (AdamW) and ``other``: ``exp_avg`` and ``exp_avg_sq`` like the parameter, a float32 ``step``;
    * ``bitsandbytes`` (AdamW8bit): two uint8 moments and one float32 absmax per 256 elements each, float32
      moments under ``min_8bit_size`` elements, two shared 256-entry quantization maps;
    * ``adafactor``: float32 (it upcasts the gradient), a matrix's or convolution's second moment factored into
      ``shape[:-1]`` and ``shape[:-2] + shape[-1:]``, a vector's whole; the weight's RMS (0-d); a first moment
      with ``beta1``;
    * ``prodigy``: ``s``, ``p0`` (the initial weights; one element for a tensor that starts all zero, which the
      plan cannot see: an upper bound), ``exp_avg_sq`` and ``exp_avg`` when ``betas[0] > 0``;
    * ``lion``: ``exp_avg``; ``schedule_free``: ``z`` and ``exp_avg_sq``.
    """
    family = optimizer.family
    total = 0
    eight_bit = False
    for shape in shapes:
        n = math.prod(shape)
        if family == "bitsandbytes":
            if n >= optimizer.min_8bit_size:
                eight_bit = True
                total += 2 * n + 2 * FLOAT32 * -(-n // BNB_BLOCK)
            else:
                total += 2 * FLOAT32 * n
        elif family == "adafactor":
            if len(shape) >= 2:
                total += FLOAT32 * (math.prod(shape[:-1]) + math.prod(shape[:-2]) * shape[-1])
            else:
                total += FLOAT32 * n
            total += (FLOAT32 * n if optimizer.first_moment else 0) + FLOAT32  # the RMS, a 0-d tensor
        elif family == "prodigy":
            total += element_bytes * n * (3 + int(optimizer.first_moment))
        elif family == "lion":
            total += element_bytes * n
        elif family == "schedule_free":
            total += 2 * element_bytes * n
        else:
            total += 2 * element_bytes * n + ADAM_STEP_BYTES
    return total + (BNB_QMAP_BYTES if eight_bit else 0)


def memory_plan(tensors: ModelTensors, setup: RunSetup, activation_bytes: int) -> MemoryPlan:
    """Each part's bytes on one rank (see the module docstring).

    Args:
        tensors: the module's parameters.
        setup: precision, strategy, optimizer, EMA.
        activation_bytes: the activations of one training step at the run's batch size, per rank.
    """
    deepspeed = setup.strategy == "deepspeed"
    n = max(1, setup.world_size)
    zero = setup.zero_stage if deepspeed else 0
    fsdp = setup.strategy == "fsdp"
    element = weight_bytes(setup.precision, setup.strategy)
    psi = tensors.trainable_numel
    shard_weights = n if (fsdp or zero >= 3) else 1
    shard_grads = n if (fsdp or zero >= 2) else 1
    shard_state = n if (fsdp or zero >= 1) else 1
    state_element = FLOAT32 if deepspeed else element
    state = optimizer_state_bytes(tensors.trainable, setup.optimizer, state_element)
    master = FLOAT32 * psi if deepspeed else 0
    parts = {
        "weights": -(-element * tensors.numel // shard_weights),
        "gradients": -(-element * psi // shard_grads),
        "master weights": -(-master // shard_state),
        "optimizer state": -(-state // shard_state),
        "EMA": FLOAT32 * psi if setup.ema else 0,
        "activations": activation_bytes,
    }
    on_host = ["master weights", "optimizer state"] if deepspeed and setup.offload_optimizer else []
    on_host += ["EMA"] if setup.ema_on_host else []
    host = {name: parts[name] for name in on_host}
    parts.update(dict.fromkeys(host, 0))
    return MemoryPlan(parts=parts, host=host, trainable_numel=psi, numel=tensors.numel)
