#!/usr/bin/env bash
# Several nodes with torchrun: run this on every node with the same MASTER_ADDR/MASTER_PORT and
# its own NODE_RANK.
#   MASTER_ADDR=node0 NODE_RANK=0 launch/torchrun_multi_node.sh 4 8 strategy=deepspeed_stage_2 data.train_dir=...
set -euo pipefail
nodes=${1:?usage: $0 NUM_NODES GPUS_PER_NODE [overrides...]}
gpus=${2:?usage: $0 NUM_NODES GPUS_PER_NODE [overrides...]}
shift 2
exec torchrun --nnodes="$nodes" --nproc_per_node="$gpus" --node_rank="${NODE_RANK:?set NODE_RANK}" \
  --master_addr="${MASTER_ADDR:?set MASTER_ADDR}" --master_port="${MASTER_PORT:-29500}" \
  -m trainer.cli.train trainer.accelerator=gpu trainer.devices="$gpus" trainer.num_nodes="$nodes" "$@"
