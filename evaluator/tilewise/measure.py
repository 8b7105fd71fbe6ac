"""Honest A/B timing: warmups, interleaved pairs, every raw sample kept, median of per-pair ratios
with a seeded bootstrap 95 % interval, and peak memory per arm.

Pair i runs both arms back to back; even pairs run stock first, odd pairs candidate first, so a
systematic order effect (caches warmed by the previous run, clock ramps) cancels instead of biasing
one arm. The ratio of pair i is stock_seconds / candidate_seconds (> 1: the candidate is faster);
pairing removes slow drifts of the machine that would widen an unpaired comparison.

Python's cyclic garbage collector is run before each sample and paused during it (as `timeit`
does): otherwise garbage made by one arm's set-up (e.g. applying a policy) is collected inside the
next timed run and shows up as a bias against whichever arm happens to allocate more.
"""

import gc

import numpy as np

import mlx.core as mx

BOOTSTRAP_RESAMPLES = 2000
# Combined score weights (the seed project's): inference counts more than training.
WEIGHTS = {"inference": 0.7, "training": 0.3}


class Cancelled(Exception):
    """Raised at a sample boundary when the caller asked to stop."""


def median_ci(ratios, seed=0, resamples=BOOTSTRAP_RESAMPLES, level=0.95):
    """(median, lo, hi): the median of `ratios` and its percentile-bootstrap interval."""
    r = np.asarray(ratios, dtype=np.float64)
    if r.size == 0:
        raise ValueError("no samples")
    med = float(np.median(r))
    if r.size == 1:
        return med, med, med
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, r.size, size=(resamples, r.size))
    meds = np.median(r[idx], axis=1)
    alpha = (1.0 - level) / 2.0
    return med, float(np.quantile(meds, alpha)), float(np.quantile(meds, 1.0 - alpha))


def interleaved(arms, pairs, warmup, *, seed=0, should_stop=None, on_sample=None):
    """Times two arms in interleaved pairs.

    `arms` maps "stock" and "candidate" to callables that each run one sample and return a dict with
    at least "seconds" (they switch the policy themselves). Returns
    {"ratio", "lo", "hi", "n_pairs", "samples": [{"pair", "arm", "seconds", ...}], "peak_memory"}.
    `should_stop()` is polled between samples (Cancelled is raised); `on_sample(done, total)` reports.
    """
    should_stop = should_stop or (lambda: False)
    names = ("stock", "candidate")
    for i in range(warmup):
        for name in names if i % 2 == 0 else names[::-1]:
            if should_stop():
                raise Cancelled()
            arms[name]()
    samples = []
    peak = {n: 0 for n in names}
    ratios = []
    for i in range(pairs):
        seconds = {}
        for name in names if i % 2 == 0 else names[::-1]:
            if should_stop():
                raise Cancelled()
            mx.reset_peak_memory()
            out = _run_sample(arms[name])
            mem = int(mx.get_peak_memory())
            peak[name] = max(peak[name], mem)
            sample = {"pair": i, "arm": name}
            sample.update({k: v for k, v in out.items() if k != "tokens"})
            sample["peak_memory"] = mem
            samples.append(sample)
            seconds[name] = out["seconds"]
        ratios.append(seconds["stock"] / seconds["candidate"])
        if on_sample:
            on_sample(i + 1, pairs)
    ratio, lo, hi = median_ci(ratios, seed=seed)
    out = {"ratio": ratio, "lo": lo, "hi": hi, "n_pairs": pairs, "ratios": ratios,
           "samples": samples, "peak_memory": peak}
    if samples and all("cpu_s" in s for s in samples):
        # The same statistic over process CPU time (secondary; see workloads.py).
        by_pair = {}
        for s in samples:
            by_pair.setdefault(s["pair"], {})[s["arm"]] = s["cpu_s"]
        cpu_ratios = [p["stock"] / p["candidate"] for p in by_pair.values() if p["candidate"] > 0]
        if cpu_ratios:
            r, l, h = median_ci(cpu_ratios, seed=seed)
            out["cpu_time"] = {"ratio": r, "lo": l, "hi": h}
    return out


def _run_sample(fn):
    gc.collect()
    gc.disable()
    try:
        return fn()
    finally:
        gc.enable()


def combine(inference, training):
    """0.7 x inference + 0.3 x training for ratio, lo and hi; a missing workload gets weight 0."""
    parts = [(WEIGHTS["inference"], inference), (WEIGHTS["training"], training)]
    parts = [(w, r) for w, r in parts if r is not None]
    if not parts:
        return None
    total = sum(w for w, _ in parts)
    return {key: sum(w * r[key] for w, r in parts) / total for key in ("ratio", "lo", "hi")}
