#!/usr/bin/env bash
# Several nodes with torchrun: run this on every node with the same MASTER_ADDR/MASTER_PORT and
# its own NODE_RANK (static rendezvous; for elastic c10d rendezvous set RDZV_ENDPOINT=host:port
# and RDZV_ID=<job id> instead, on every node).
#   MASTER_ADDR=node0 NODE_RANK=0 launch/torchrun_multi_node.sh 4 8 strategy=deepspeed_stage_2 data.train_dir=...
#   MASTER_ADDR=node0 NODE_RANK=0 launch/torchrun_multi_node.sh --dry-run 4 8 ...   # print the command only
set -euo pipefail
source "$(dirname "$0")/_run.sh"
[[ -n "$dry_run" ]] && shift
nodes=${1:?usage: $0 [--dry-run] NUM_NODES GPUS_PER_NODE [overrides...]}
gpus=${2:?usage: $0 [--dry-run] NUM_NODES GPUS_PER_NODE [overrides...]}
shift 2
if [[ -n "${RDZV_ENDPOINT:-}" ]]; then
  rendezvous=(--rdzv_backend=c10d --rdzv_endpoint="$RDZV_ENDPOINT" --rdzv_id="${RDZV_ID:?set RDZV_ID}")
else
  rendezvous=(--node_rank="${NODE_RANK:?set NODE_RANK}" --master_addr="${MASTER_ADDR:?set MASTER_ADDR}"
    --master_port="${MASTER_PORT:-29500}")
fi
run torchrun --nnodes="$nodes" --nproc_per_node="$gpus" "${rendezvous[@]}" \
  -m trainer.cli.train trainer.accelerator=gpu trainer.devices="$gpus" trainer.num_nodes="$nodes" "$@"
