# Rust unit and integration tests of the daemon crate (real daemon, real socket, real SQLite).
set -euo pipefail
cargo test --locked -p tilewise
