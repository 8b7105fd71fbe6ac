# Python evaluator tests on CPU MLX with the tiny model.
set -uo pipefail
.venv/bin/python -m pytest -q evaluator/tests; rc=$?
[ $rc = 5 ] && { echo "pytest collected no tests" >&2; exit 1; }
exit $rc
