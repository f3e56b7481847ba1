#!/usr/bin/env bash
# Several nodes with torchrun: run this on every node with the same MASTER_ADDR/MASTER_PORT and
# its own NODE_RANK (static rendezvous; for elastic c10d rendezvous set RDZV_ENDPOINT=host:port
# and RDZV_ID=<job id> instead, on every node).
#   RUN_DIR=outputs/train/big MASTER_ADDR=node0 NODE_RANK=0 launch/torchrun_multi_node.sh 4 8 strategy=deepspeed_stage_2 ...
#   RUN_DIR=... MASTER_ADDR=node0 NODE_RANK=0 launch/torchrun_multi_node.sh --dry-run 4 8 ...   # print the command only
# RUN_DIR (a folder every node sees, the same on every node) is the run: the same RUN_DIR again
# continues it (auto_resume=true); torchrun restarts a failed group up to MAX_RESTARTS (3) times.
set -euo pipefail
source "$(dirname "$0")/_run.sh"
[[ -n "$dry_run" ]] && shift
nodes=${1:?usage: $0 [--dry-run] NUM_NODES GPUS_PER_NODE [overrides...]}
gpus=${2:?usage: $0 [--dry-run] NUM_NODES GPUS_PER_NODE [overrides...]}
shift 2
run_dir=${RUN_DIR:?set RUN_DIR, the run\'s output folder: the same on every node, the same again to resume}
if [[ -n "${RDZV_ENDPOINT:-}" ]]; then
  rendezvous=(--rdzv_backend=c10d --rdzv_endpoint="$RDZV_ENDPOINT" --rdzv_id="${RDZV_ID:?set RDZV_ID}")
else
  rendezvous=(--node_rank="${NODE_RANK:?set NODE_RANK}" --master_addr="${MASTER_ADDR:?set MASTER_ADDR}"
    --master_port="${MASTER_PORT:-29500}")
fi
# a restarted group must not read the previous attempt's addresses from a shared store (pytorch#135712)
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
run torchrun --nnodes="$nodes" --nproc_per_node="$gpus" "${rendezvous[@]}" --max-restarts="${MAX_RESTARTS:-3}" \
  --signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 -m trainer.cli.train \
  trainer.accelerator=gpu trainer.devices="$gpus" trainer.num_nodes="$nodes" hydra.run.dir="$run_dir" \
  auto_resume=true "$@"
