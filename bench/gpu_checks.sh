#!/usr/bin/env bash
# Every GPU check of the GPU issue in one device call (../shared/gpu/README.md):
#   bash .gpu/run.sh bash bench/gpu_checks.sh 2>&1 | tee $OUT/log      (carry [".gpu"])
# 1. the GPU-marked tests: each strategy trains in bf16-mixed and 16-mixed (fp16 loss scaling;
#    DeepSpeed's fp16 mode), resumes, exports and samples; 2. training throughput table (256 and
#    512 px); 3. precompute throughput (256 and 512 px). Set SKIP_TESTS=1 or SKIP_PRECOMPUTE=1 to shorten.
set -uo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python -c "import torch, lightning, deepspeed, diffusers; print('torch', torch.__version__, 'lightning', lightning.__version__, 'deepspeed', deepspeed.__version__, 'diffusers', diffusers.__version__)"
if [[ -z "${SKIP_TESTS:-}" ]]; then
  echo "== GPU tests"; time python -m pytest -q -m gpu -p no:cacheprovider tests 2>&1 | tail -25
fi
echo "== training throughput"; time bash bench/gpu_train.sh
if [[ -z "${SKIP_PRECOMPUTE:-}" ]]; then
  echo "== precompute throughput"
  python bench/gpu_precompute.py --resolution 256 --batch 64 --images 2048
  python bench/gpu_precompute.py --resolution 512 --batch 32 --images 1024
fi
