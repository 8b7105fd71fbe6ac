#!/usr/bin/env bash
# Runs on the lent GPU machine (root, Python 3.12 with numpy/pytest/transformers, no network), from the
# repository root. Installs MLX CUDA from the wheels this repo's caller carried (see bench/gpu/README.md),
# then one STEP, writing logs under $OUT (the device tool returns that folder):
#   kernels [ARGS]   smoke-compile one kernel of each body, the GPU kernel tests, bench/gpu/kernel_bench.py ARGS
#   e2e [ARGS]       bench/gpu/e2e_bench.py ARGS (tuned policy vs stock through the evaluator)
#   evaluator [ARGS] evaluator/bench/evaluator_bench.py ARGS (issue 3's H100 benchmark)
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
W=/root/mlxw
SITE=/tmp/site
export PYTHONUNBUFFERED=1
# NVLink multicast stays off (device README); harmless on one GPU.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1

install() {
  if PYTHONPATH=$SITE python3 -c "import mlx.core as mx, mlx_lm; assert mx.cuda.is_available()" 2>/dev/null; then
    echo "mlx cuda already installed in $SITE"; return 0
  fi
  [ -f "$W/part_aa" ] && [ -f "$W/part_ab" ] || { echo "wheel parts missing in $W (carry .mlxcuda/p1 then p2)"; return 1; }
  ( cd "$W" && cat part_aa part_ab > mlx_cuda_13-0.32.4-py3-none-manylinux_2_35_x86_64.whl ) || return 1
  extra=(); [ -d .whl ] && extra=(.whl/*.whl)
  python3 -m pip install -q --no-index --no-deps --no-compile --target "$SITE" \
    "$W"/mlx-0.32.4-*.whl "$W"/mlx_cuda_13-*.whl "$W"/mlx_lm-*.whl "${extra[@]}" || return 1
}

install || exit 1
export PYTHONPATH=$SITE:$PWD/evaluator
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,temperature.gpu --format=csv | tee "$OUT/nvidia-smi.txt"
python3 -c "import mlx.core as mx; print('mlx', mx.__version__, mx.default_device(), 'cuda', mx.cuda.is_available())"

step=${1:-kernels}; shift || true
case "$step" in
  kernels)
    python3 bench/gpu/smoke.py 2>&1 | tee "$OUT/smoke.log" || exit 1
    python3 -m pytest -q -x evaluator/tests/test_kernels.py evaluator/tests/test_kernels_gpu.py 2>&1 | tail -n 40 | tee "$OUT/pytest_gpu.log"
    python3 bench/gpu/kernel_bench.py --out "$OUT" "$@"
    mkdir -p /root/kb && cp "$OUT/kernel_bench.json" /root/kb/ 2>/dev/null  # for a later e2e step on this machine
    ;;
  e2e) python3 bench/gpu/e2e_bench.py --out "$OUT" "$@" ;;
  evaluator) python3 evaluator/bench/evaluator_bench.py "$@" 2>&1 | tee "$OUT/evaluator_bench.log" ;;
  *) echo "unknown step $step"; exit 2 ;;
esac
