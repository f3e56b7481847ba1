#!/usr/bin/env bash
# One node, N GPUs, one process per GPU, started by torchrun (Lightning sees torchrun's environment
# and does not start processes of its own).
#   launch/torchrun_single_node.sh 8 strategy=deepspeed_stage_2 data.train_dir=latents/ trainer.precision=bf16-mixed
#   launch/torchrun_single_node.sh --dry-run 8 ...        # print the command only
# Restarts: a worker that dies (or hangs: distributed.timeout_s) restarts the group, up to
# MAX_RESTARTS (3) times, and it resumes from the newest checkpoint of RUN_DIR (auto_resume=true).
# RUN_DIR (default outputs/train/torchrun-<now>) is the run: the same RUN_DIR again continues it.
# SIGTERM or SIGUSR1 to torchrun reaches every worker: they checkpoint the step and exit 75.
set -euo pipefail
source "$(dirname "$0")/_run.sh"
[[ -n "$dry_run" ]] && shift
gpus=${1:?usage: $0 [--dry-run] NUM_GPUS [overrides...]}
shift
run_dir=${RUN_DIR:-outputs/train/torchrun-$(date +%Y-%m-%d_%H-%M-%S)}
# a restarted group must not read the previous attempt's addresses from a shared store (pytorch#135712)
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
run torchrun --standalone --nproc_per_node="$gpus" --max-restarts="${MAX_RESTARTS:-3}" \
  --signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 -m trainer.cli.train \
  trainer.accelerator=gpu trainer.devices="$gpus" hydra.run.dir="$run_dir" auto_resume=true "$@"
