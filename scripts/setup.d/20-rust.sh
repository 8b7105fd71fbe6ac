# The daemon and CLI (release build is what the main job runs; tests build their own debug binaries).
set -euo pipefail
command -v cargo >/dev/null || { echo "cargo not found: install Rust from https://rustup.rs" >&2; exit 1; }
cargo build --locked -q -p tilewise --bins
