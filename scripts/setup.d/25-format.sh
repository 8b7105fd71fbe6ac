# The formatters the format suite runs (scripts/test.d/05-format.sh): rustfmt (a rustup component; a
# minimal-profile toolchain lacks it) and ruff (pinned in evaluator/pyproject.toml's test extra, so
# 10-python.sh installed it into .venv).
set -euo pipefail
if ! command -v cargo >/dev/null && [ -x "$HOME/.cargo/bin/cargo" ]; then export PATH="$HOME/.cargo/bin:$PATH"; fi
cargo fmt --version >/dev/null 2>&1 || rustup component add rustfmt
.venv/bin/ruff --version >/dev/null
