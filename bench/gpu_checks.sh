#!/usr/bin/env bash
# Every GPU check of the GPU issue in one device call. Here first: bash bench/gpu_bundle.sh; then
#   device run: bash .gpu/run.sh bash bench/gpu_checks.sh      carry [".gpu"], timeout_s 590
# Parts, most wanted first, each under its own time limit (seconds; env T_512, T_256, T_TESTS, T_PRE)
# and written to its own file in $OUT, so a stall costs only its part and the rest still comes back.
# No pipes: a killed command's children (inductor's compile workers) can hold a pipe open for ever.
# 1. training throughput at 512 px (bench/gpu_train.py: plain, single, compiled, zero2, compiled_zero2);
# 2. the same at 256 px (plain, compiled); 3. the GPU-marked tests (each strategy in bf16-mixed and
# 16-mixed: trains, resumes, exports, samples); 4. precompute throughput at 256 px; 5. (not in the default
# PARTS: it needs a session of its own) SDXL's UNet at 1024 px, batch 8: plain, single, zero2 (T_SDXL);
# 6. (not in the default PARTS either) DeepSpeed settings on one GPU at 512 px: single vs zero2 and its
# variants, uncompiled (T_ZERO), to choose conf/strategy/deepspeed_stage_2.yaml's settings; 7. (not in the
# default PARTS) candidates for the default recipe at 512 px: compiled vs compiled + channels_last, compiled
# with CUDA graphs (reduce-overhead), and compiled at batch 64 (T_RECIPE each, two runs); 8. (not in the default
# PARTS) the memory plan against torch.cuda.max_memory_allocated (bench/memory_plan.py --device cuda: tiny and
# SD-1.5-shaped at 512 px, bf16; T_MEM; without CUDA it prints "skipped" and exits 0).
# PARTS="train512 train256 tests precompute sdxl1024 zero512 recipe512 memplan" chooses the parts and their order.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-$(mktemp -d)}
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TORCHINDUCTOR_FX_GRAPH_CACHE=1
# A checkout that is not pip-installed has no package latentforge_conf (pyproject maps it to conf/).
python -c "import latentforge_conf" 2>/dev/null || ln -sfn conf latentforge_conf
peak=${PEAK_TFLOPS:-989}
started=$(date +%s)
part() {  # part NAME LIMIT COMMAND...: run it into $out/NAME.log, then show its last lines
  local name=$1 limit=$2; shift 2
  echo "== $name (limit ${limit}s) at $(( $(date +%s) - started ))s"
  timeout -k 10 "$limit" "$@" > "$out/$name.log" 2>&1 < /dev/null
  echo "== $name: exit $? at $(( $(date +%s) - started ))s"
  grep -E "^(\||measured|ratio|plain|lf-precompute|memory_plan|FAILED|ERROR)|[0-9]+ (passed|failed|skipped|errors?)\b" "$out/$name.log" | tail -20
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
for name in ${PARTS:-train512 train256 tests precompute}; do
  case $name in
    train512) part train512 "${T_512:-280}" python bench/gpu_train.py --resolution 512 --batch 32 --peak-tflops "$peak" ;;
    train256) part train256 "${T_256:-140}" python bench/gpu_train.py --resolution 256 --batch 128 \
      --configs plain,compiled --peak-tflops "$peak" ;;
    tests) part tests "${T_TESTS:-90}" python -m pytest -q -m gpu -p no:cacheprovider tests/integration/test_gpu.py \
      tests/unit/test_precision.py ;;
    precompute) part precompute "${T_PRE:-50}" python bench/gpu_precompute.py --resolution 256 --batch 64 --images 2048 ;;
    sdxl1024) part sdxl1024 "${T_SDXL:-300}" python bench/gpu_train.py --model sdxl --resolution 1024 --batch 8 \
      --configs plain,single,zero2 --steps 10 --warmup 3 --peak-tflops "$peak" ;;
    zero512) part zero512 "${T_ZERO:-240}" python bench/gpu_train.py --resolution 512 --batch 32 \
      --configs single,zero2,zero1,zero2_no_overlap,zero2_no_contiguous,zero2_big_buckets --steps 12 --warmup 3 \
      --peak-tflops "$peak" ;;
    recipe512) part recipe512 "${T_RECIPE:-300}" python bench/gpu_train.py --resolution 512 --batch 32 \
        --configs compiled,compiled_channels_last,compiled_cudagraphs --steps 12 --warmup 3 --peak-tflops "$peak"
      part recipe512_batch64 "${T_RECIPE:-300}" python bench/gpu_train.py --resolution 512 --batch 64 \
        --configs compiled --steps 8 --warmup 3 --peak-tflops "$peak" ;;
    memplan) part memplan "${T_MEM:-150}" python bench/memory_plan.py --device cuda \
      --models tiny,sd15-512,sd15-512-checkpointing ;;
    *) echo "unknown part $name (train512 train256 tests precompute sdxl1024 zero512 recipe512 memplan)"; exit 2 ;;
  esac
done
