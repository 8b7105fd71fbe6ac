#!/usr/bin/env bash
# Idle footprint of the real daemon: starts tilewised in a temp TILEWISE_HOME, lets it settle, then
# samples its resident memory (/proc/<pid>/status VmRSS, every second) and its CPU time
# (/proc/<pid>/stat utime+stime, all threads) over DURATION seconds, and prints both against the
# goal: <= 20 MB RSS and <= 0.1 % of one CPU. Context switches (summed over the threads
# alive at the end) show how often it wakes up: a busy-polling daemon wakes thousands of times a
# minute.
#
# Usage: bench/idle_footprint.sh [--out FILE]    (env: DURATION=60, SETTLE=5, TILEWISED=path)
# Results of the committed run: bench/results/idle_footprint.txt
set -euo pipefail
cd "$(dirname "$0")/.."
out=""
[ "${1:-}" = "--out" ] && out=$2
DURATION=${DURATION:-60}
SETTLE=${SETTLE:-5}
bin=${TILEWISED:-}
if [ -z "$bin" ]; then
  bin=target/release/tilewised
  [ -x "$bin" ] || bin=target/debug/tilewised
fi
[ -x "$bin" ] || { echo "no tilewised binary: cargo build --release -p tilewise --bin tilewised" >&2; exit 1; }

home=$(mktemp -d)
pid=""
cleanup() {
  if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then kill "$pid"; wait "$pid" 2>/dev/null || true; fi
  rm -rf "$home"
}
trap cleanup EXIT

TILEWISE_HOME=$home "$bin" --log-level warn 2>"$home/stderr.log" &
pid=$!
for _ in $(seq 100); do [ -S "$home/run/tilewised.sock" ] && break; sleep 0.1; done
[ -S "$home/run/tilewised.sock" ] || { echo "tilewised did not start:" >&2; cat "$home/stderr.log" >&2; exit 1; }
sleep "$SETTLE"

clk=$(getconf CLK_TCK)
cpu_ticks() { # utime + stime of the whole process (fields 14 and 15, counted after the ")" of comm)
  sed 's/^.*) //' "/proc/$pid/stat" | awk '{print $12 + $13}'
}
ctx_by_thread() { # "tid switches" per live thread (voluntary + involuntary)
  for t in /proc/"$pid"/task/*; do
    awk -v tid="${t##*/}" '/ctxt_switches/ {s += $2} END {print tid, s + 0}' "$t/status" 2>/dev/null || true
  done
}
ctx_delta() { # switches since $1 (a ctx_by_thread snapshot); threads started since count from 0
  ctx_by_thread | awk -v before="$1" 'BEGIN {n = split(before, a, "\n"); for (i = 1; i <= n; i++) {split(a[i], f, " "); b[f[1]] = f[2]}}
    {d += $2 - ($1 in b ? b[$1] : 0)} END {print d + 0}'
}
rss_kb() { awk '/^VmRSS/ {print $2}' "/proc/$pid/status"; }

t0=$(date +%s.%N); c0=$(cpu_ticks); x0=$(ctx_by_thread)
max_rss=0; sum_rss=0; n=0
for _ in $(seq "$DURATION"); do
  sleep 1
  kill -0 "$pid" 2>/dev/null || { echo "tilewised exited during the run:" >&2; cat "$home/stderr.log" >&2; exit 1; }
  r=$(rss_kb); sum_rss=$((sum_rss + r)); n=$((n + 1)); [ "$r" -gt "$max_rss" ] && max_rss=$r
done
t1=$(date +%s.%N); c1=$(cpu_ticks); switches=$(ctx_delta "$x0")
hwm=$(awk '/^VmHWM/ {print $2}' "/proc/$pid/status")
# What the resident memory is: anonymous (heap, stacks) vs file-backed (the binary's code, libraries).
anon=$(awk '/^RssAnon/ {print $2}' "/proc/$pid/status")
file=$(awk '/^RssFile/ {print $2}' "/proc/$pid/status")
threads=$(ls "/proc/$pid/task" | wc -l)

report=$(awk -v t0="$t0" -v t1="$t1" -v c0="$c0" -v c1="$c1" -v clk="$clk" -v max="$max_rss" -v sum="$sum_rss" \
  -v n="$n" -v hwm="$hwm" -v anon="$anon" -v file="$file" -v sw="$switches" -v thr="$threads" -v bin="$bin" -v dur="$DURATION" 'BEGIN {
  el = t1 - t0; cpu_s = (c1 - c0) / clk; pct = 100 * cpu_s / el
  max_mb = max / 1024; mean_mb = sum / n / 1024; hwm_mb = hwm / 1024
  printf "idle footprint of %s over %.1f s (%d RSS samples, %d threads)\n", bin, el, n, thr
  printf "%-28s %14s %10s %s\n", "metric", "measured", "goal", "verdict"
  printf "%-28s %11.2f MB %7s MB %s\n", "RSS max", max_mb, "20", (max_mb <= 20 ? "ok" : "OVER")
  printf "%-28s %11.2f MB %10s\n", "RSS mean", mean_mb, ""
  printf "%-28s %11.2f MB %10s\n", "RSS high-water (VmHWM)", hwm_mb, ""
  printf "%-28s %11.2f MB %10s\n", "  anonymous (heap, stacks)", anon / 1024, ""
  printf "%-28s %11.2f MB %10s\n", "  file-backed (code, libs)", file / 1024, ""
  printf "%-28s %12.3f %% %8s %% %s\n", "CPU (one core)", pct, "0.1", (pct <= 0.1 ? "ok" : "OVER")
  printf "%-28s %12.3f s %10s\n", "CPU time", cpu_s, ""
  if (c1 == c0) printf "  (no clock tick charged: under %.3f s, i.e. under %.4f %%)\n", 1 / clk, 100 / clk / el
  printf "%-28s %12.1f /s %9s\n", "context switches", sw / el, ""
  printf "ratios to goal: RSS %.2fx, CPU %.2fx (below 1 = within the goal)\n", max_mb / 20, pct / 0.1
}')
header="$(date -u +%Y-%m-%dT%H:%M:%SZ) $(uname -srm), $(nproc) CPUs, load $(cut -d' ' -f1-3 /proc/loadavg)"
printf '%s\n%s\n' "$header" "$report"
[ -n "$out" ] && printf '%s\n%s\n' "$header" "$report" > "$out"
exit 0
