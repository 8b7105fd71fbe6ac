# The daemon and CLI: a Rust toolchain, a C compiler (rusqlite builds the bundled SQLite), and a
# debug build of tilewised + tilewise (the tests build their own; scripts/tune builds release).
set -euo pipefail
if ! command -v cc >/dev/null && [ "$(uname -s)" = Linux ] && command -v apt-get >/dev/null; then
  SUDO=; [ "$(id -u)" = 0 ] || SUDO=sudo
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -q
  $SUDO apt-get install -y -q --no-install-recommends build-essential pkg-config
fi
if ! command -v cargo >/dev/null && [ -x "$HOME/.cargo/bin/cargo" ]; then export PATH="$HOME/.cargo/bin:$PATH"; fi
if ! command -v cargo >/dev/null; then
  # Distribution packages of cargo are too old for the pinned dependencies (Rust >= 1.85 needed).
  if command -v curl >/dev/null && curl -fsS --max-time 10 https://sh.rustup.rs -o /tmp/rustup-init.sh; then
    sh /tmp/rustup-init.sh -y --profile minimal
    export PATH="$HOME/.cargo/bin:$PATH"
  else
    echo "cargo not found and rustup.rs unreachable: install Rust >= 1.85 from https://rustup.rs" >&2
    exit 1
  fi
fi
cargo build --locked -q -p tilewise --bins
