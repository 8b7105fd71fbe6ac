# The Python environment: MLX (CPU wheel on Linux, Metal on macOS), mlx-lm and the evaluator package
# (evaluator/pyproject.toml pins mlx and mlx-lm). Re-installs when pyproject.toml changed.
set -euo pipefail
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv || { echo "could not create .venv: on Debian/Ubuntu run 'apt-get install -y python3-venv'" >&2; exit 1; }
fi
if ! .venv/bin/python -c "import tilewise, mlx_lm, pytest" 2>/dev/null || [ evaluator/pyproject.toml -nt .venv/.tilewise-installed ]; then
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -e "./evaluator[test]"
  touch .venv/.tilewise-installed
fi
