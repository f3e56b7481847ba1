#!/usr/bin/env bash
# An Optuna sweep on one node with N GPUs: N sweeper workers, one per GPU (CUDA_VISIBLE_DEVICES=i),
# sharing one study (Optuna's storage), so N trials run at once and hydra.sweeper.n_trials counts
# them all. Each worker's trial folders go under SWEEP_DIR/worker-i; the summary of all trials is
# written to SWEEP_DIR when the workers are done.
#
#   launch/sweep_gpus.sh 8 hparams_search=lr_optuna experiment=sweep_short \
#       data.train_dir=latents/train data.val_dir=latents/val hydra.sweeper.n_trials=64
#   launch/sweep_gpus.sh --dry-run 2 hparams_search=lr_optuna ...   # print the worker commands only
#
# Environment: SWEEP_DIR (default multirun/train/sweep_gpus), STORAGE (default
# sqlite:///$SWEEP_DIR/optuna.db; use a PostgreSQL/MySQL URL for many workers or several nodes),
# CPU_ONLY=1 to leave CUDA_VISIBLE_DEVICES alone (testing on a CPU machine).
set -euo pipefail
dry_run=0
if [[ "${1:-}" == "--dry-run" ]]; then dry_run=1; shift; fi
workers=${1:?usage: $0 [--dry-run] NUM_GPUS [overrides...]}
shift
sweep_dir=${SWEEP_DIR:-multirun/train/sweep_gpus}
storage=${STORAGE:-sqlite:///$sweep_dir/optuna.db}
lf_train=${LF_TRAIN:-lf-train}
lf_summary=${LF_SWEEP_SUMMARY:-lf-sweep-summary}

pids=()
for ((i = 0; i < workers; i++)); do
  cmd=("$lf_train" -m "$@" "hydra.sweep.dir=$sweep_dir/worker-$i" "hydra.sweeper.storage=$storage")
  if [[ -z "${CPU_ONLY:-}" ]]; then cmd=(env "CUDA_VISIBLE_DEVICES=$i" "${cmd[@]}"); fi
  if ((dry_run)); then
    printf '%q ' "${cmd[@]}"; echo
    continue
  fi
  mkdir -p "$sweep_dir"
  "${cmd[@]}" >"$sweep_dir/worker-$i.log" 2>&1 &
  pids+=($!)
  sleep 2  # let the first worker create the study before the others load it
done
if ((dry_run)); then
  printf '%q ' "$lf_summary" "sweep_dir=$sweep_dir"; echo
  exit 0
fi
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
"$lf_summary" "sweep_dir=$sweep_dir"
exit "$status"
