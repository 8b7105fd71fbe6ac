# The reliability suite, reduced form (reliability/run --quick; the full form's table is in
# bench/results/reliability-full.txt): protocol conformance and live fuzz, 16-client load, security
# (other UID, socket modes, inert policy content, planted wrong policy), faults (corrupted database,
# kill -9 during sessions, worker hang/crash/garbage/oom, read-only database, disk full). Timing goals
# are reported, not gated, in this form. The libFuzzer run needs its own sanitizer build of the whole
# dependency tree (several minutes on 2 cores), so CI includes it (45 s of fuzzing) only with
# TILEWISE_RELIABILITY_FUZZ=1 (scripts/setup.d/60-reliability.sh then installs cargo-fuzz).
set -euo pipefail
cargo test --locked -q -p tilewise-reliability
checks=live-fuzz,load,security,faults
[ "${TILEWISE_RELIABILITY_FUZZ:-0}" = 1 ] && checks=fuzz,$checks
reliability/run --quick --only "$checks" --out target/reliability-quick.txt
