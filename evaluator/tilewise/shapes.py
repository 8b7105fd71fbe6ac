"""Shape microbenchmarks: one (M, N, K, dtype, plan) at a time, plan vs native, for the daemon's
shape memo (its cheap cost model).

The plan runs through the same code path as in a model: a stand-alone `nn.Linear(K, N, bias=False)`
patched with a one-rule policy (so a plan here costs exactly what it costs inside a model). Timing
uses measure.interleaved (warmups, alternating pairs, bootstrap interval). One sample = `reps`
evaluated calls, with `reps` calibrated during warmup so that a sample lasts at least
MIN_SAMPLE_S (a single decode-size matmul takes microseconds, below timer and dispatch noise).
`rel_err` is the plan's output against a float32 reference of the same inputs.
"""

import hashlib
import time

import mlx.core as mx
import mlx.nn as nn

from . import gate, measure, patch, policy
from .models import DTYPES

MIN_SAMPLE_S = 0.002
MAX_REPS = 1000
MAX_DIM = 1 << 20


def plan_hash(plan):
    """`sha256:` of the plan's canonical JSON (the memo's key for a plan)."""
    return "sha256:" + hashlib.sha256(policy.canonical_json(plan).encode("utf-8")).hexdigest()


def item_policy(item):
    """The one-rule policy that applies `item["plan"]` to exactly this (M, N, K)."""
    m, n, k = item["m"], item["n"], item["k"]
    return policy.make_policy(rules=[{"m": [m, m], "n": [n, n], "k": [k, k], "plan": item["plan"]}])


def bench_item(item, *, pairs=10, warmup=2, seed=0, should_stop=None):
    """Microbenchmarks one item (dict with m, n, k, dtype, plan). A plan that fails to run gives
    correct=False and an `error`, never an exception (measure.Cancelled excepted)."""
    m, n, k, dtype = item["m"], item["n"], item["k"], item["dtype"]
    out = {
        "m": m,
        "n": n,
        "k": k,
        "dtype": dtype,
        "plan": item["plan"],
        "plan_hash": plan_hash(item["plan"]),
        "native_s": [],
        "plan_s": [],
        "native_median_s": None,
        "plan_median_s": None,
        "ratio": None,
        "lo": None,
        "hi": None,
        "rel_err": None,
        "correct": False,
        "error": None,
    }
    doc = item_policy(item)  # PolicyError for an invalid plan: the caller reports it
    key = mx.random.key(seed)
    kx, kw = mx.random.split(key)
    x = mx.random.normal((m, k), key=kx).astype(DTYPES[dtype])
    layer = nn.Linear(k, n, bias=False)
    layer.weight = (mx.random.normal((n, k), key=kw) * (k**-0.5)).astype(DTYPES[dtype])
    mx.eval(x, layer.parameters())
    reference = x.astype(mx.float32) @ layer.weight.astype(mx.float32).T

    prepared = patch.prepare(doc)
    try:
        patch.apply(layer, prepared)
        y = layer(x)
        mx.eval(y)
        out["rel_err"] = gate.rel_err(y, reference)
    except Exception as e:
        out["error"] = f"plan raised {type(e).__name__}: {e}"
        return out
    finally:
        patch.remove(layer)
    out["correct"] = out["rel_err"] <= gate.tolerance(dtype)

    # Calibrate on native (after one warm call): the fastest of 3 single calls decides how many
    # calls one sample holds.
    mx.eval(layer(x))
    single = float("inf")
    for _ in range(3):
        tic = time.perf_counter()
        mx.eval(layer(x))
        single = min(single, time.perf_counter() - tic)
    single = max(single, 1e-7)
    reps = int(min(MAX_REPS, max(1, MIN_SAMPLE_S / single)))

    def timed():
        cpu = time.process_time()
        tic = time.perf_counter()
        for _ in range(reps):
            mx.eval(layer(x))
        return {"seconds": (time.perf_counter() - tic) / reps, "cpu_s": (time.process_time() - cpu) / reps}

    def native():
        patch.remove(layer)
        return timed()

    def planned():
        patch.apply(layer, prepared)
        try:
            return timed()
        finally:
            patch.remove(layer)

    r = measure.interleaved({"stock": native, "candidate": planned}, pairs, warmup, seed=seed, should_stop=should_stop)
    out["native_s"] = [s["seconds"] for s in r["samples"] if s["arm"] == "stock"]
    out["plan_s"] = [s["seconds"] for s in r["samples"] if s["arm"] == "candidate"]
    out["native_median_s"] = _median(out["native_s"])
    out["plan_median_s"] = _median(out["plan_s"])
    out.update(ratio=r["ratio"], lo=r["lo"], hi=r["hi"], reps=reps, cpu_time=r.get("cpu_time"))
    return out


def _median(xs):
    s = sorted(xs)
    mid = len(s) // 2
    return s[mid] if len(s) % 2 else (s[mid - 1] + s[mid]) / 2


def check_item(item, index):
    """Structural checks of one request item; returns an error text naming the field, or None."""
    if not isinstance(item, dict):
        return f"items[{index}]: an object with m, n, k, dtype, plan"
    for f in ("m", "n", "k"):
        v = item.get(f)
        if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= MAX_DIM:
            return f"items[{index}].{f}: an integer in 1..{MAX_DIM}"
    if item.get("dtype") not in DTYPES:
        return f"items[{index}].dtype: one of {', '.join(DTYPES)}"
    if not isinstance(item.get("plan"), dict):
        return f"items[{index}].plan: a plan object"
    return None
