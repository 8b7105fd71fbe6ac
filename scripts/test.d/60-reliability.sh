# The reliability suite, reduced form (reliability/run --quick; the full form's table is in
# bench/results/reliability-full.txt): protocol conformance and live fuzz, 16-client load, security
# (other UID, socket modes, inert policy content, planted wrong policy), faults (corrupted database,
# kill -9 during a session, worker hang/crash/garbage/oom, read-only database, disk full) and a
# 45 s libFuzzer run of the protocol target. Timing goals are reported, not gated, in this form.
set -euo pipefail
cargo test --locked -q -p tilewise-reliability
reliability/run --quick --out target/reliability-quick.txt
