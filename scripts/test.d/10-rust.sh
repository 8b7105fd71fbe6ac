# Rust unit and integration tests of the daemon crate (real daemon, real socket, real SQLite).
# `cargo test` also compiles the examples, so the benchmark (examples/bench_ipc.rs) cannot rot.
set -euo pipefail
if ! command -v cargo >/dev/null && [ -x "$HOME/.cargo/bin/cargo" ]; then export PATH="$HOME/.cargo/bin:$PATH"; fi
cargo test --locked -p tilewise --no-fail-fast
