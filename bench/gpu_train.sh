#!/usr/bin/env bash
# GPU training throughput at SD 1.5 scale (random init), bf16, one GPU: the plain diffusers loop and
# lf-train single / compiled (the default GPU recipe) / ZeRO-2 / compiled + ZeRO-2, at 256 and 512 px,
# in one run (bench/gpu_train.py prints a table per resolution, compile time apart from step time).
#   bench/gpu_train.sh                     # BATCH_256=128 BATCH_512=32 to change
#   PEAK_TFLOPS=989 bench/gpu_train.sh     # the card's dense bf16 peak for MFU (H100 SXM: 989, H200: 989)
set -uo pipefail
cd "$(dirname "$0")/.."
peak=${PEAK_TFLOPS:-989}
export TORCHINDUCTOR_FX_GRAPH_CACHE=1     # the second compile of the same graph reuses the first's kernels
python bench/gpu_train.py --resolution 256 --batch "${BATCH_256:-128}" --peak-tflops "$peak" "$@"
python bench/gpu_train.py --resolution 512 --batch "${BATCH_512:-32}" --peak-tflops "$peak" "$@"
