# Formatting and lint are checked by tools, not by reviewers: cargo fmt (rustfmt.toml) for the Rust
# workspace and the fuzz crate, ruff format and ruff check (configured in evaluator/pyproject.toml)
# for the evaluator and bench/. Fix with `cargo fmt --all`, `ruff format` and `ruff check --fix`.
set -uo pipefail
rc=0
cargo fmt --all --check || rc=1
(cd fuzz && cargo fmt --check) || rc=1
RUFF=(.venv/bin/ruff --config evaluator/pyproject.toml)
"${RUFF[@]}" format --check evaluator bench || rc=1
"${RUFF[@]}" check evaluator bench || rc=1
exit $rc
