"""DeepSpeed's private names that latentforge uses, and why no public API does the job.

``deepspeed.ops.__compatible_ops__`` (``trainer.strategies.deepspeed``, on CPU): when DeepSpeed's
torch communication backend starts (``TorchBackend.__init__``), it compiles and loads its
shared-memory all-reduce op (``deepspeed_shm_comm``) whenever that op is marked compatible, which on
Linux it always is: 30 to 60 s of gcc on 2 cores the first time, and again whenever another
environment (another venv's torch headers) built it into the same ``TORCH_EXTENSIONS_DIR``. Only
inference tensor parallelism calls it (``inference_all_reduce``); ZeRO training reduces through the
process group (gloo) and never does. No setting or environment variable turns the build off
(``DS_BUILD_SHM_COMM`` is read when DeepSpeed is installed, not when it runs); marking the op
incompatible in this dict, which DeepSpeed keeps for the process, makes ``build_shm_op`` return
``None``, and ``inference_all_reduce`` then falls back to the process group.
"""

from __future__ import annotations

from lf_common.upstream_contract import PrivateName

ADAPTER = "trainer/strategies/deepspeed_private.py"
SHM_COMM_OP = "deepspeed_shm_comm"


def skip_shm_comm_op() -> None:
    """Mark DeepSpeed's CPU shared-memory all-reduce op incompatible, so the backend neither compiles nor
    loads it (call before the DeepSpeed process group starts)."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__[SHM_COMM_OP] = False


CONTRACTS = (
    PrivateName("deepspeed", "deepspeed.ops", "__compatible_ops__", ADAPTER, kind="attribute"),
    PrivateName(
        "deepspeed", "deepspeed.comm.torch.build_shm_op", "__compatible_ops__.get(builder.NAME", ADAPTER, kind="source"
    ),
    PrivateName(
        "deepspeed", "deepspeed.ops.op_builder.cpu.comm.ShareMemCommBuilder", "NAME", ADAPTER, kind="attribute"
    ),
)
