#!/usr/bin/env bash
# GPU training throughput at SD 1.5 scale (random init), 256 and 512 px, bf16, DeepSpeed ZeRO-2 on
# one GPU, for a list of batch sizes (largest first; an out-of-memory batch is reported and skipped):
# lf-train vs a plain PyTorch + diffusers loop on the same card in the same run.
#   bench/gpu_train.sh                     # BATCHES_256="128 64 32" BATCHES_512="32 16 8" to change
#   PEAK_TFLOPS=989 bench/gpu_train.sh     # the card's dense bf16 peak for MFU (H100 SXM: 989)
set -uo pipefail
cd "$(dirname "$0")/.."
peak=${PEAK_TFLOPS:-800}
for resolution in 256 512; do
  var="BATCHES_${resolution}"
  default=$([[ $resolution == 256 ]] && echo "128 64 32" || echo "32 16 8")
  for batch in ${!var:-$default}; do
    echo "== ${resolution}px batch ${batch}"
    if python bench/gpu_train.py --resolution "$resolution" --batch "$batch" --peak-tflops "$peak" "$@"; then
      break  # the largest batch that fits
    fi
  done
done
