#!/usr/bin/env bash
# DeepSpeed's own launcher with a hostfile (one line per node, "node0 slots=8"; see
# hostfile.example): run once, on the first node; it starts the processes on every node over
# pdsh/ssh (passwordless ssh between nodes, the same paths everywhere). Lightning takes the ranks
# from the environment; DeepSpeed names the node rank CROSS_RANK, so node_rank_env.sh maps it to
# NODE_RANK before starting lf-train.
#   launch/deepspeed_hostfile.sh launch/hostfile.example 8 strategy=deepspeed_stage_3 data.train_dir=...
#   launch/deepspeed_hostfile.sh --dry-run launch/hostfile.example 8 ...   # print the command only
# RUN_DIR (default outputs/train/deepspeed-<now>, chosen here once for every node) is the run: the
# same RUN_DIR again continues it from its newest checkpoint (auto_resume=true).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
source "$here/_run.sh"
[[ -n "$dry_run" ]] && shift
hostfile=${1:?usage: $0 [--dry-run] HOSTFILE GPUS_PER_NODE [overrides...]}
gpus=${2:?usage: $0 [--dry-run] HOSTFILE GPUS_PER_NODE [overrides...]}
shift 2
nodes=$(grep -cvE '^[[:space:]]*(#|$)' "$hostfile")
first=$(awk '!/^[[:space:]]*(#|$)/ {print $1; exit}' "$hostfile")
run_dir=${RUN_DIR:-outputs/train/deepspeed-$(date +%Y-%m-%d_%H-%M-%S)}
run deepspeed --hostfile="$hostfile" --num_nodes="$nodes" --num_gpus="$gpus" \
  --master_addr="${MASTER_ADDR:-$first}" --master_port="${MASTER_PORT:-29500}" \
  --no_python --no_local_rank "$here/node_rank_env.sh" \
  lf-train trainer.accelerator=gpu trainer.devices="$gpus" trainer.num_nodes="$nodes" hydra.run.dir="$run_dir" \
  auto_resume=true "$@"
