#!/usr/bin/env bash
# Do the Python suite's statistical tests (A/A, intervals, races) hold on a loaded box? Runs the
# suite RUNS times (default 10) while a release build of the daemon in a scratch target directory
# keeps every core busy (rebuilt from clean whenever it finishes), and prints one line per run and
# the count of failing runs. Failures' logs are kept under OUT (default bench/results/under-load/).
#
#   bench/python_under_load.sh [RUNS] [OUT]
set -uo pipefail
cd "$(dirname "$0")/.."
runs=${1:-10}
out=${2:-bench/results/under-load}
mkdir -p "$out"
scratch=$(mktemp -d /tmp/tilewise-load-XXXXXX)
(
  while true; do
    cargo build --release --locked -q -p tilewise --target-dir "$scratch" >/dev/null 2>&1
    rm -rf "$scratch/release"
  done
) &
load=$!
trap 'kill $load 2>/dev/null; pkill -P $load 2>/dev/null; rm -rf "$scratch"' EXIT
sleep 20  # let the build get going
failed=0
echo "# python suite under load: $runs runs, $(nproc) cores, $(date -u '+%Y-%m-%d %H:%M UTC')"
for i in $(seq 1 "$runs"); do
  start=$(date +%s)
  log="$out/run-$i.log"
  .venv/bin/python -m pytest -q -p no:cacheprovider evaluator/tests >"$log" 2>&1
  rc=$?
  load1=$(cut -d' ' -f1 /proc/loadavg)
  summary=$(grep -E "passed|failed" "$log" | tail -n 1)
  echo "run $i: rc $rc, $(( $(date +%s) - start )) s, load $load1: $summary"
  if [ $rc -ne 0 ]; then failed=$((failed + 1)); else rm -f "$log"; fi
done
echo "runs with a failure: $failed of $runs"
[ $failed -eq 0 ]
