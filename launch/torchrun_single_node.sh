#!/usr/bin/env bash
# One node, N GPUs, one process per GPU, started by torchrun (Lightning sees torchrun's environment
# and does not start processes of its own).
#   launch/torchrun_single_node.sh 8 strategy=deepspeed_stage_2 data.train_dir=latents/ trainer.precision=bf16-mixed
set -euo pipefail
gpus=${1:?usage: $0 NUM_GPUS [overrides...]}
shift
exec torchrun --standalone --nproc_per_node="$gpus" -m trainer.cli.train \
  trainer.accelerator=gpu trainer.devices="$gpus" "$@"
