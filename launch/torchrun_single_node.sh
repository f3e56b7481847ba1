#!/usr/bin/env bash
# One node, N GPUs, one process per GPU, started by torchrun (Lightning sees torchrun's environment
# and does not start processes of its own).
#   launch/torchrun_single_node.sh 8 strategy=deepspeed_stage_2 data.train_dir=latents/ trainer.precision=bf16-mixed
#   launch/torchrun_single_node.sh --dry-run 8 ...        # print the command only
set -euo pipefail
source "$(dirname "$0")/_run.sh"
[[ -n "$dry_run" ]] && shift
gpus=${1:?usage: $0 [--dry-run] NUM_GPUS [overrides...]}
shift
run torchrun --standalone --nproc_per_node="$gpus" -m trainer.cli.train \
  trainer.accelerator=gpu trainer.devices="$gpus" "$@"
