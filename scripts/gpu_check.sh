#!/usr/bin/env bash
# The whole GPU check in one command, for the GPU host (see ../shared/gpu-host/README.md):
#   source .gpu-host/setup.sh && scripts/gpu_check.sh [OUT_DIR]
# Runs the GPU tests, then `raytp bench`; logs and the benchmark JSON go to OUT_DIR.
set -uo pipefail
out=${1:-${OUT:-out}}
mkdir -p "$out"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
nvidia-smi topo -m >> "$out/gpu.txt" 2>&1
python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu.py tests/test_bench.py ${PYTEST_ARGS:-} \
  2>&1 | tee "$out/gpu_tests.log"
tests=${PIPESTATUS[0]}
if [[ "${SKIP_BENCH:-0}" != 1 ]]; then
  python3 -m raytp bench ${BENCH_ARGS:-} --json "$out/bench.json" > "$out/bench.md" 2> "$out/bench.log"
  tail -n 80 "$out/bench.md"
  python3 -m raytp.bench.report "$out/bench.json" > "$out/benchmarks.md"
fi
exit "$tests"
