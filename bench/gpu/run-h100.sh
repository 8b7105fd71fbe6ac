#!/usr/bin/env bash
# Runs on the lent GPU machine (root, Python 3.12 with numpy/pytest/transformers, no network), from the
# repository root. Installs MLX CUDA from the wheels this repo's caller carried (see docs/kernels.md, "Running on the H100"),
# then one STEP, writing logs under $OUT (the device tool returns that folder):
#   tests            smoke-compile one kernel of each body, then the kernel tests (CPU and GPU suites)
#   kernels [ARGS]   smoke, then bench/gpu/kernel_bench.py ARGS (wall time per op, pairs, intervals)
#   gputime          bench/gpu/gpu_time.py under Nsight Compute (GPU time per op, native vs best plan)
#   chain            bench/gpu/chain_check.py (is kernel_bench's mx.depends chain a real dependency?)
#   e2e [ARGS]       bench/gpu/e2e_bench.py ARGS (tuned policy vs stock through the evaluator)
#   batched [ARGS]   bench/gpu/batched_decode.py ARGS (tuned policy vs stock, batched decode, B = 1/4/8/16)
#   evaluator [ARGS] bench/evaluator_bench.py on Qwen2.5-0.5B bf16 (the evaluator's H100 overhead benchmark)
#   plugin           bench/plugin_bench.py on Qwen2.5-0.5B bf16, no daemon (the plugin's H100 overhead figure)
#   tune [BUDGET] [MODEL]  the real daemon (release binaries carried xz-compressed in .devbin/) runs a
#                    default tuning session (default 240s, synthetic:qwen2.5-0.5b) in /root/twhome; its
#                    history, policy and database go to $OUT
#   remeasure [ARGS] bench/remeasure.py ARGS (bf16): fresh homes, each a promotion, its re-measurement in a
#                    fresh worker and a later-day re-measurement session; the figure is the deviation
#   levels [ARGS]    bench/gpu/training_levels.py ARGS (the training ratio's levels, per sample, by variant)
#   fusionmem [ARGS] bench/gpu/fusion_memory.py ARGS (active memory after each stage of a fused evaluation)
#   llama [ARGS]     that best retargeted to a Llama-3.2-1B-shaped bf16 model: decode B = 1 and 8 vs stock
#   fusion [ARGS]    bench/fusion_bench.py against that daemon's best: bf16 (all workloads), then the
#                    same policy retargeted to a 4-bit copy (decode B=1, B=8, prefill); ARGS to both
#   fusionfile POLICY  bench/fusion_bench.py without a daemon: POLICY (a policy file, e.g. run13's
#                    fuse-siblings.policy.json) retargeted to a 4-bit Qwen copy (decode B=1, prefill 512)
#                    and to a Llama-3.2-1B-shaped bf16 model (decode B=1, B=8)
# Kernel results for gputime/e2e/batched: $KR_SET, else /root/kb/kernel_bench.json (this machine's last kernels
# step), else results/h100/run8-kernels-full/kernel_bench.json (committed: the data-chain sweep of all 30 rows).
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
W=/root/mlxw
SITE=/tmp/site
export PYTHONUNBUFFERED=1
# NVLink multicast stays off (device README); harmless on one GPU.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1

install() {
  if PYTHONPATH=$SITE python3 -c "import mlx.core as mx, mlx_lm, jsonschema; assert mx.cuda.is_available()" 2>/dev/null; then
    echo "mlx cuda already installed in $SITE"; return 0
  fi
  [ -f "$W/part_aa" ] && [ -f "$W/part_ab" ] || { echo "wheel parts missing in $W (carry .mlxcuda/p1 then p2)"; return 1; }
  ( cd "$W" && cat part_aa part_ab > mlx_cuda_13-0.32.4-py3-none-manylinux_2_35_x86_64.whl ) || return 1
  extra=(); [ -d .whl ] && extra=(.whl/*.whl)
  python3 -m pip install -q --no-index --no-deps --no-compile --target "$SITE" \
    "$W"/mlx-0.32.4-*.whl "$W"/mlx_cuda_13-*.whl "$W"/mlx_lm-*.whl "${extra[@]}" || return 1
}

install || exit 1

# The daemon for `tune` and `fusion`: release binaries carried as .devbin/*.xz, unpacked once per machine.
TWBIN=/root/twbin
export TILEWISE_HOME=${TILEWISE_HOME:-/root/twhome} TILEWISE_PYTHON=python3
unpack_daemon() {
  [ -x "$TWBIN/tilewised" ] && return 0
  mkdir -p "$TWBIN"
  for f in .devbin/*.xz; do xz -dc "$f" > "$TWBIN/$(basename "${f%.xz}")" || return 1; done
  chmod +x "$TWBIN"/*
}
start_daemon() {
  unpack_daemon || return 1
  "$TWBIN/tilewise" status >/dev/null 2>&1 || "$TWBIN/tilewise" daemon start
}
export PYTHONPATH=$SITE:$PWD/evaluator
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,temperature.gpu --format=csv | tee "$OUT/nvidia-smi.txt"
python3 -c "import mlx.core as mx; print('mlx', mx.__version__, mx.default_device(), 'cuda', mx.cuda.is_available())"

# STEP may be several, comma-separated (e.g. tests,gputime); ARGS go to the last python step.
steps=${1:-kernels}; shift || true
rc=0
for step in ${steps//,/ }; do
  KR=${KR_SET:-/root/kb/kernel_bench.json}; [ -f "$KR" ] || KR=results/h100/run8-kernels-full/kernel_bench.json
  case "$step" in
    tests)
      python3 bench/gpu/smoke.py 2>&1 | tee "$OUT/smoke.log" || exit 1
      python3 -m pytest -q evaluator/tests/test_kernels.py evaluator/tests/test_kernels_gpu.py 2>&1 | tail -n 60 | tee "$OUT/pytest_gpu.log"
      ;;
    kernels)
      python3 bench/gpu/smoke.py 2>&1 | tee "$OUT/smoke.log" || exit 1
      python3 bench/gpu/kernel_bench.py --out "$OUT" "$@" || rc=1
      mkdir -p /root/kb && cp "$OUT/kernel_bench.json" /root/kb/ 2>/dev/null  # for later steps on this machine
      ;;
    gputime)
      NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -n 1)
      echo "ncu: $NCU; kernel results: $KR"
      "$NCU" --csv --print-units base --clock-control none --metrics gpu__time_duration.sum \
        python3 bench/gpu/gpu_time.py --emit --kernel-results "$KR" > "$OUT/ncu_raw.csv" 2> "$OUT/ncu_stderr.log" || { rc=1; tail -n 20 "$OUT/ncu_stderr.log"; }
      python3 bench/gpu/gpu_time.py --parse "$OUT/ncu_raw.csv" --kernel-results "$KR" --out "$OUT" 2>&1 | tee "$OUT/gpu_time.log"
      ;;
    chain) python3 bench/gpu/chain_check.py --kernel-results "$KR" 2>&1 | tee "$OUT/chain_check.log" || rc=1 ;;
    plugin) python3 bench/plugin_bench.py --model synthetic:qwen2.5-0.5b --dtype bfloat16 --prompt-tokens 512 \
              --gen-tokens 64 --pairs 40 --no-daemon --out "$OUT/plugin-bench.txt" 2>&1 | tail -n 40 || rc=1 ;;
    e2e) python3 bench/gpu/e2e_bench.py --out "$OUT" --kernel-results "$KR" "$@" 2>&1 | tee "$OUT/e2e.log" || rc=1 ;;
    batched) python3 bench/gpu/batched_decode.py --out "$OUT" --kernel-results "$KR" "$@" 2>&1 | tee "$OUT/batched.log" || rc=1 ;;
    evaluator) python3 bench/evaluator_bench.py --model synthetic:qwen2.5-0.5b --dtype bfloat16 --out "$OUT" "$@" 2>&1 \
                 | tee "$OUT/evaluator_bench.log" || rc=1 ;;
    tune)
      start_daemon || exit 1
      budget=${1:-240s}; model=${2:-}
      "$TWBIN/tilewise" tune --budget "$budget" ${model:+--model "$model"} 2>&1 | tee -a "$OUT/tune.log" || rc=1
      "$TWBIN/tilewise" history 2>&1 | tee -a "$OUT/history.txt"
      python3 bench/gpu/best_policy.py > "$OUT/best-policies.json" 2>&1
      cp "$OUT/best-policies.json" "$TILEWISE_HOME/best-policies.json"  # for the llama step on this machine
      "$TWBIN/tilewise" daemon stop
      cp "$TILEWISE_HOME/tilewise.db" "$OUT/tilewise-${model//[^A-Za-z0-9]/_}.db" 2>/dev/null
      ;;
    remeasure)
      # Fresh homes of their own (not $TILEWISE_HOME): promotion, re-measurement, later-day session.
      unpack_daemon || exit 1
      python3 bench/remeasure.py --daemon "$TWBIN/tilewised" --dtype bfloat16 --later-day \
        --out "$OUT/remeasure.txt" "$@" || rc=1
      ;;
    levels)
      # The training ratio's levels: per-sample figures of the evaluator's own measurement, by variant.
      ( nvidia-smi --query-gpu=timestamp,clocks.sm,utilization.gpu,power.draw --format=csv -lms 500 > "$OUT/clocks.csv" & echo $! > /tmp/smi.pid )
      python3 bench/gpu/training_levels.py --out "$OUT" "$@" 2>&1 | tee "$OUT/training_levels.txt" | grep -v '^      ' || rc=1
      kill "$(cat /tmp/smi.pid)" 2>/dev/null
      ;;
    fusionmem)
      python3 bench/gpu/fusion_memory.py "$@" 2>&1 | tee "$OUT/fusion_memory.txt" || rc=1
      ;;
    fusion)
      start_daemon || exit 1
      python3 bench/fusion_bench.py --model synthetic:qwen2.5-0.5b --from-daemon --tag bf16 --out "$OUT/fusion-bf16" "$@" || rc=1
      python3 bench/fusion_bench.py --model synthetic:qwen2.5-0.5b --from-daemon --quantize 4 --retarget --tag q4 \
        --only decode1,decode8,prefill --out "$OUT/fusion-q4" "$@" || rc=1
      "$TWBIN/tilewise" daemon stop
      ;;
    fusionfile)
      policy=${1:?fusionfile needs a policy file}; shift
      python3 bench/fusion_bench.py --model synthetic:qwen2.5-0.5b --policy "$policy" --quantize 4 --retarget --tag q4 \
        --only decode1,prefill --out "$OUT/fusion-q4" "$@" || rc=1
      python3 bench/fusion_bench.py --model synthetic:llama-3.2-1b --dtype bfloat16 --policy "$policy" --retarget \
        --tag llama1b --only decode1,decode8 --out "$OUT/fusion-llama1b" "$@" || rc=1
      ;;
    llama)
      # The Qwen-shaped session's best, retargeted to a Llama-3.2-1B-shaped model (fusion groups name
      # sibling roles, not shapes, so they carry over): decode B = 1 against stock.
      start_daemon || exit 1
      qwen=$(python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print(d['best'][0]['policy']['target']['model'] if isinstance(d['best'][0]['policy'], dict) else json.loads(d['best'][0]['policy'])['target']['model'])" "$TILEWISE_HOME/best-policies.json") || { echo "no best policy from a tune step on this machine"; exit 1; }
      python3 bench/fusion_bench.py --model synthetic:llama-3.2-1b --dtype bfloat16 --from-daemon --retarget \
        --retarget-from "$qwen" --tag llama1b --only decode1,decode8 --out "$OUT/fusion-llama1b" "$@" || rc=1
      "$TWBIN/tilewise" daemon stop
      ;;
    *) echo "unknown step $step"; exit 2 ;;
  esac
done
exit $rc
