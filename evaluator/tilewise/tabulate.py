"""Turn an OpenEvolve-style `choose_tile_size(M, N, K, device_info)` into policy data.

The function is code (possibly LLM-written), so it runs only here, in a separate Python process
(`python -I`, no tilewise or MLX imported) with a wall-clock limit, an address-space limit and a CPU
time limit. It is called once per (M bucket, N, K) of the loaded model's shapes, and the answers
become `split` rules: the daemon stores and serves data, never code.

`choose_tile_size` returns `(tile_m, tile_n, tile_k)` (each an int or None = do not split that axis)
or None (= native). A tile at least as large as its dimension means no split on that axis; a plan
with no split at all becomes native (and is left to the default).

M buckets: `m_values` (sorted, distinct, >= 1; default DEFAULT_M_VALUES) split M into ranges
[v_i, v_{i+1} - 1] and [v_last, unbounded); the function is asked at each range's lower end v_i.
"""

import json
import subprocess
import sys

import mlx.core as mx

from . import backend, policy

DEFAULT_M_VALUES = [1, 8, 64, 512]
DEFAULT_TIME_LIMIT_S = 10.0
MAX_TILE = 1048576
MEMORY_LIMIT_BYTES = 2 << 30

# Runs in the child: reads {"source", "queries", "device_info"} on stdin, prints one JSON line.
_RUNNER = r"""
import json, sys, traceback
try:
    import resource
    limits = json.loads(sys.argv[1])
    resource.setrlimit(resource.RLIMIT_AS, (limits["as"], limits["as"]))
    resource.setrlimit(resource.RLIMIT_CPU, (limits["cpu"], limits["cpu"] + 1))
except Exception:
    pass
req = json.loads(sys.stdin.read())
out = {"answers": None, "error": None}
try:
    ns = {"__name__": "choose_tile_size_module"}
    exec(compile(req["source"], "<choose_tile_size>", "exec"), ns)
    fn = ns.get("choose_tile_size")
    if not callable(fn):
        raise NameError("the source does not define choose_tile_size(M, N, K, device_info)")
    answers = []
    for m, n, k in req["queries"]:
        a = fn(m, n, k, dict(req["device_info"]))
        answers.append(None if a is None else list(a) if isinstance(a, (tuple, list)) else repr(a))
    out["answers"] = answers
except BaseException as e:
    out["error"] = "".join(traceback.format_exception_only(type(e), e)).strip()
sys.stdout.write(json.dumps(out) + "\n")
"""


class TabulateError(ValueError):
    pass


def device_info():
    """The `device_info` dict `choose_tile_size` receives on this machine (worker and plugin alike)."""
    info = {"backend": backend.backend(), "device_name": backend.device_name(), "mlx": mx.__version__}
    try:
        info.update({k: v for k, v in mx.device_info().items() if isinstance(v, (int, float, str))})
    except Exception:
        pass
    return info


def _buckets(m_values):
    if (
        not isinstance(m_values, list)
        or not m_values
        or any(not isinstance(v, int) or isinstance(v, bool) or v < 1 for v in m_values)
        or sorted(set(m_values)) != m_values
    ):
        raise TabulateError("m_values: a non-empty sorted list of distinct integers >= 1")
    return [(v, m_values[i + 1] - 1 if i + 1 < len(m_values) else None) for i, v in enumerate(m_values)]


def run_choose_tile_size(source, queries, device_info, time_limit_s=DEFAULT_TIME_LIMIT_S):
    """Answers of `choose_tile_size` for each (M, N, K) query, from a separate, limited process."""
    limits = json.dumps({"as": MEMORY_LIMIT_BYTES, "cpu": int(time_limit_s) + 1})
    payload = json.dumps({"source": source, "queries": queries, "device_info": device_info})
    try:
        proc = subprocess.run(
            [sys.executable, "-I", "-c", _RUNNER, limits],
            input=payload,
            capture_output=True,
            text=True,
            timeout=time_limit_s,
        )
    except subprocess.TimeoutExpired:
        raise TabulateError(f"choose_tile_size did not finish within {time_limit_s:g} s") from None
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        raise TabulateError(f"choose_tile_size process failed (exit {proc.returncode}): {proc.stderr.strip()[-500:]}")
    out = json.loads(lines[-1])
    if out["error"]:
        raise TabulateError(f"choose_tile_size raised: {out['error']}")
    return out["answers"]


def _plan(answer, m, n, k, where):
    if answer is None:
        return {"kind": "native"}
    if not isinstance(answer, list) or len(answer) != 3:
        raise TabulateError(f"{where}: expected (tile_m, tile_n, tile_k) or None, got {answer!r}")
    tiles = []
    for name, t, dim in zip(("tile_m", "tile_n", "tile_k"), answer, (m, n, k)):
        if t is not None and (not isinstance(t, int) or isinstance(t, bool) or not 1 <= t <= MAX_TILE):
            raise TabulateError(f"{where}: {name} must be an integer in 1..{MAX_TILE} or None, got {t!r}")
        # An M tile only splits the bucket's larger M values, so it is kept even when >= m.
        tiles.append(None if t is None or (name != "tile_m" and t >= dim) else t)
    if all(t is None for t in tiles):
        return {"kind": "native"}
    return policy.split_plan(*tiles)


def tabulate(
    source,
    shapes,
    *,
    device_info,
    target,
    m_values=None,
    time_limit_s=DEFAULT_TIME_LIMIT_S,
    name="tabulated choose_tile_size",
):
    """The policy that `choose_tile_size` describes over `shapes` ([{n, k, ...}]) and M buckets."""
    buckets = _buckets(list(m_values or DEFAULT_M_VALUES))
    queries = [[lo, s["n"], s["k"]] for lo, _ in buckets for s in shapes]
    answers = run_choose_tile_size(source, queries, device_info, time_limit_s)
    rules = []
    for (m, n, k), answer, (lo, hi) in zip(queries, answers, [b for b in buckets for _ in shapes]):
        plan = _plan(answer, m, n, k, f"choose_tile_size({m}, {n}, {k})")
        if plan["kind"] != "native":
            rules.append({"m": [lo, hi], "n": [n, n], "k": [k, k], "plan": plan})
    if len(rules) > 256:
        raise TabulateError(f"{len(rules)} rules exceed the schema's 256: use fewer m_values")
    return policy.make_policy(rules=rules, name=name, target=target)
