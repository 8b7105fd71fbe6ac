# The Python environment: MLX (CPU wheel on Linux, Metal on macOS), mlx-lm and the evaluator package.
set -euo pipefail
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then "$PY" -m venv .venv; fi
if ! .venv/bin/python -c "import tilewise, mlx_lm, pytest" 2>/dev/null || [ evaluator/pyproject.toml -nt .venv/.tilewise-installed ]; then
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -e "./evaluator[test]"
  touch .venv/.tilewise-installed
fi
