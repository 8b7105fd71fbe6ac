#!/usr/bin/env bash
# Runs the Python suite N times (default 10) while a release build of the daemon keeps every core
# busy, the way CI runs on a shared box. The statistical tests (A/A intervals, promotion) must hold
# under that load; one failing run fails this script.
#
#   bash bench/suite_under_load.sh [RUNS] [REPORT]
#
# Run it from a clone of its own (with .venv linked and target/debug copied) to keep editing
# meanwhile: the tests read the checkout's files as they go. The build uses its own scratch target dir and `cargo clean`s it between builds, so the load never
# stops and the repository's target/ is untouched. Each run's line records pytest's summary, its
# wall time and the 1-minute load average at its end, so the report shows the load was real.
set -uo pipefail
cd "$(dirname "$0")/.."
# This checkout's evaluator, even where the venv's editable install points at another clone.
export PYTHONPATH="$PWD/evaluator${PYTHONPATH:+:$PYTHONPATH}"

runs=${1:-10}
report=${2:-bench/results/suite-under-load-$(date -u +%Y-%m-%d).txt}
scratch=$(mktemp -d /tmp/tilewise-load-build.XXXXXX)
log_dir=$(mktemp -d /tmp/tilewise-load-logs.XXXXXX)
cores=$(nproc)

load_loop() {
  local n=0
  while true; do
    n=$((n + 1))
    echo "build $n started $(date -u +%H:%M:%S)" >>"$log_dir/builds.txt"
    CARGO_TARGET_DIR="$scratch" cargo build -q --release -p tilewise -j "$cores" >>"$log_dir/build.log" 2>&1
    cargo clean -q --target-dir "$scratch" >/dev/null 2>&1
  done
}

load_loop &
loop_pid=$!
stop_load() {
  kill -- "$loop_pid" 2>/dev/null
  pkill -f "CARGO_TARGET_DIR=$scratch" 2>/dev/null
  pkill -f -- "--target-dir $scratch" 2>/dev/null
  # Cargo's children (rustc) carry the scratch dir in their arguments.
  pkill -f "$scratch" 2>/dev/null
  rm -rf "$scratch"
}
trap stop_load EXIT

sleep 20 # let the build reach its parallel compile phase before the first run
{
  echo "# Python suite under a concurrent release build ($cores cores, $(date -u +%Y-%m-%dT%H:%MZ))"
  echo "# command: .venv/bin/python -m pytest -q evaluator/tests   load: cargo build --release -p tilewise -j $cores, looped"
  echo "# run  rc  seconds  load1  summary"
} | tee "$report"

failed=0
for i in $(seq 1 "$runs"); do
  start=$(date +%s)
  .venv/bin/python -m pytest -q -p no:cacheprovider evaluator/tests >"$log_dir/run$i.log" 2>&1
  rc=$?
  secs=$(($(date +%s) - start))
  load1=$(cut -d' ' -f1 /proc/loadavg)
  summary=$(tail -n 1 "$log_dir/run$i.log")
  printf '%4d  %2d  %7d  %5s  %s\n' "$i" "$rc" "$secs" "$load1" "$summary" | tee -a "$report"
  if [ "$rc" != 0 ]; then
    failed=$((failed + 1))
    grep -E "^(FAILED|ERROR)" "$log_dir/run$i.log" | sed 's/^/        /' | tee -a "$report"
    cp "$log_dir/run$i.log" "${report%.txt}-run$i.log"
  fi
done

builds=$(wc -l <"$log_dir/builds.txt")
echo "# $((runs - failed)) of $runs runs passed; $builds release builds were started meanwhile" | tee -a "$report"
rm -rf "$log_dir"
[ "$failed" = 0 ]
