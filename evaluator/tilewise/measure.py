"""Honest A/B timing: warmups, interleaved pairs, every raw sample kept, median of per-pair ratios
with a seeded bootstrap 95 % interval, and peak memory per arm.

Pair i runs both arms back to back; even pairs run stock first, odd pairs candidate first, so a
systematic order effect (caches warmed by the previous run, clock ramps) cancels instead of biasing
one arm. The ratio of pair i is stock_seconds / candidate_seconds (> 1: the candidate is faster);
pairing removes slow drifts of the machine that would widen an unpaired comparison.

Python's cyclic garbage collector is run before each sample and paused during it (as `timeit`
does): otherwise garbage made by one arm's set-up (e.g. applying a policy) is collected inside the
next timed run and shows up as a bias against whichever arm happens to allocate more. The heap that
exists when a measurement starts (the model, mlx_lm, every imported module) is moved to the
collector's permanent generation for the measurement's duration (`gc.freeze`): a full collection of
it cost about 50 ms per sample on the tiny CPU model — a third of an evaluation — while the garbage
the arms make is young and is still collected before every sample. A heap someone else froze
first (a library may) is left as it is: see `interleaved`.

Racing (`Race`): an end-to-end evaluation may stop before all its pairs when it can no longer be
promoted — after at least `min_pairs` pairs, the combined upper bound (finished workloads at their
interval's `hi`, the running one at its current `hi`, workloads not started at `assume_hi`) is
below `bar`. It only ever stops losers: a measurement whose `hi` is below the bar has `lo` below it
too, and promotion needs `lo` above it. The daemon never races a confirmation or a re-measurement.

A race may also extend a workload (`max_pairs` > pairs): after its `pairs`, while its median is above
`bar` and its interval is still wider than `halfwidth` on either side, one more pair at a time, up to
`max_pairs`. A real effect of a few per cent (fusion on a small CPU model: ~4 %) then gets the pairs it
needs to be resolved instead of ending "not proven" on a loaded machine. The rule looks at the
interval's *width*, not at whether it clears the bar: extending "until the lower bound is above 1"
would be optional stopping, and in a simulation of A/A measurements (tests/test_measure.py) it let
14.5 % of them pass against 5 % without extension; the width rule stays at the unextended rate. A
median at or below the bar ends the extension (that can only lose a pass, never make one). The
daemon still confirms a passing measurement with a second one of as many pairs, never extended.
"""

import contextlib
import contextvars
import gc

import mlx.core as mx
import numpy as np

BOOTSTRAP_RESAMPLES = 2000
# Combined score weights (the seed project's): inference counts more than training.
WEIGHTS = {"inference": 0.7, "training": 0.3}


class Cancelled(Exception):
    """Raised at a sample boundary when the caller asked to stop."""


class Race:
    """The early-stop rule of one evaluation (see the module doc).

    `workloads` names the workloads the evaluation measures, in the order it measures them
    (evaluate.py: inference, then training); each `interleaved` call under `racing(race)` takes the
    next one. `state()` is what the evaluate result reports under `race`."""

    def __init__(
        self, workloads, *, bar=1.0, min_pairs=3, assume_hi=1.25, max_pairs=None, halfwidth=0.02, weights=None
    ):
        workloads = list(workloads)
        if not workloads:
            raise ValueError("race: no workload")
        if not isinstance(min_pairs, int) or min_pairs < 2:
            raise ValueError("race.min_pairs: an integer >= 2 (one pair has no interval)")
        for name, v in (("bar", bar), ("assume_hi", assume_hi)):
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not 0 < v < 1e6:
                raise ValueError(f"race.{name}: a positive number")
        if max_pairs is not None and (
            not isinstance(max_pairs, int) or isinstance(max_pairs, bool) or not 2 <= max_pairs <= 10000
        ):
            raise ValueError("race.max_pairs: an integer in 2..10000 (extend a promising workload up to it)")
        if not isinstance(halfwidth, (int, float)) or isinstance(halfwidth, bool) or not 0 < halfwidth < 1:
            raise ValueError("race.halfwidth: a number in (0, 1): extend while the interval is wider than this")
        self.workloads = workloads
        self.max_pairs = max_pairs
        self.halfwidth = float(halfwidth)
        self.extended = {}  # workload -> pairs taken beyond the requested number
        self.bar = float(bar)
        self.min_pairs = min_pairs
        self.assume_hi = float(assume_hi)
        self.weights = weights or WEIGHTS
        self.hi = {}  # workload -> latest upper bound
        self.started = 0
        self.stopped_in = None
        self.pairs_taken = {}

    def begin(self):
        """The next workload's name (called by `interleaved`)."""
        if self.started >= len(self.workloads):
            raise RuntimeError(f"race: more measurements than workloads {self.workloads}")
        name = self.workloads[self.started]
        self.started += 1
        return name

    def bound(self):
        """Weighted upper bound of the combined ratio with what is known now."""
        parts = [(self.weights[w], self.hi.get(w, self.assume_hi)) for w in self.workloads]
        total = sum(w for w, _ in parts)
        return sum(w * h for w, h in parts) / total

    def should_stop(self, name, ratios, seed):
        """After a pair of workload `name`: record its interval, decide."""
        self.pairs_taken[name] = len(ratios)
        if len(ratios) < self.min_pairs:
            return False
        _, _, hi = median_ci(ratios, seed=seed)
        self.hi[name] = hi
        if self.bound() < self.bar:
            self.stopped_in = self.stopped_in or name
            return True
        return False

    def extend(self, name, ratios, pairs, seed):
        """After the requested `pairs` (and each pair beyond): one more pair while the workload's
        median is above the bar, its interval is wider than `halfwidth` on either side of the median,
        and `max_pairs` is not reached (see the module doc for why not "until lo clears the bar")."""
        if self.max_pairs is None or len(ratios) >= self.max_pairs:
            return False
        ratio, lo, hi = median_ci(ratios, seed=seed)
        more = ratio > self.bar and max(ratio - lo, hi - ratio) > self.halfwidth
        if more:
            self.extended[name] = len(ratios) + 1 - pairs
        return more

    def state(self):
        return {
            "stopped_early": self.stopped_in is not None,
            "stopped_in": self.stopped_in,
            "bar": self.bar,
            "min_pairs": self.min_pairs,
            "assume_hi": self.assume_hi,
            "max_pairs": self.max_pairs,
            "halfwidth": self.halfwidth,
            "extended": dict(self.extended),
            "bound": self.bound(),
            "pairs_taken": dict(self.pairs_taken),
        }


_RACE = contextvars.ContextVar("tilewise_race", default=None)


@contextlib.contextmanager
def racing(race):
    """Every `interleaved` call inside uses `race` (None: no racing). The worker sets it around
    `evaluate.evaluate`, whose measurement calls need not know about it."""
    token = _RACE.set(race)
    try:
        yield race
    finally:
        _RACE.reset(token)


def block_length(ratios):
    """How many consecutive pairs the bootstrap resamples together: 1 for pairs that look independent;
    more when consecutive pair ratios are correlated in time (a machine phase that favours one arm for
    a while), where resampling single pairs would treat a few phases as many independent pairs and
    give an interval too narrow. The lag-1 autocorrelation must clear its own noise (2 / sqrt(n));
    the length is the AR(1) variance inflation (1 + rho) / (1 - rho), keeping at least 3 blocks."""
    r = np.asarray(ratios, dtype=np.float64)
    n = r.size
    if n < 6:
        return 1
    x = r - r.mean()
    denom = float((x * x).sum())
    if denom <= 0.0:
        return 1
    rho = float((x[:-1] * x[1:]).sum() / denom)
    if rho <= 2.0 / np.sqrt(n):
        return 1
    return int(min(max(1.0, np.ceil((1.0 + rho) / (1.0 - rho))), n // 3))


def median_ci(ratios, seed=0, resamples=BOOTSTRAP_RESAMPLES, level=0.95):
    """(median, lo, hi): the median of `ratios` and its percentile-bootstrap interval — of single
    pairs, or of blocks of consecutive pairs (circular) when the pairs are correlated in time
    (`block_length`)."""
    r = np.asarray(ratios, dtype=np.float64)
    if r.size == 0:
        raise ValueError("no samples")
    med = float(np.median(r))
    if r.size == 1:
        return med, med, med
    rng = np.random.default_rng(seed)
    n, length = r.size, block_length(r)
    if length == 1:
        idx = rng.integers(0, n, size=(resamples, n))
    else:
        starts = rng.integers(0, n, size=(resamples, -(-n // length)))
        idx = ((starts[:, :, None] + np.arange(length)[None, None, :]) % n).reshape(resamples, -1)[:, :n]
    meds = np.median(r[idx], axis=1)
    alpha = (1.0 - level) / 2.0
    return med, float(np.quantile(meds, alpha)), float(np.quantile(meds, 1.0 - alpha))


def interleaved(arms, pairs, warmup, *, seed=0, should_stop=None, on_sample=None, race=None):
    """Times two arms in interleaved pairs.

    `arms` maps "stock" and "candidate" to callables that each run one sample and return a dict with
    at least "seconds" (they switch the policy themselves). Returns
    {"ratio", "lo", "hi", "n_pairs", "samples": [{"pair", "arm", "seconds", ...}], "peak_memory"}.
    `should_stop()` is polled between samples (Cancelled is raised); `on_sample(done, total)` reports.
    `race` (default: the one set by `racing`) may end the pairs early; `n_pairs` is then the number
    taken and `stopped_early` is true.
    """
    race = race if race is not None else _RACE.get()
    race_name = race.begin() if race is not None else None
    # Only a heap nobody froze before is frozen (and thawed after). Freezing on top of someone else's
    # freeze could never be undone without undoing theirs, so whatever was alive at the start (a
    # policy's fused weights, half a GiB on a 0.5B model) would stay frozen, unreachable but never
    # collected, once per evaluation. Their freeze already holds most of the heap.
    ours = gc.get_freeze_count() == 0
    gc.collect()
    if ours:
        gc.freeze()
    try:
        return _interleaved(arms, pairs, warmup, seed, should_stop, on_sample, race, race_name)
    finally:
        if ours:
            gc.unfreeze()


def _interleaved(arms, pairs, warmup, seed, should_stop, on_sample, race, race_name):
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
    i = 0
    while True:
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
        i += 1
        if on_sample:
            on_sample(i, max(pairs, i))
        if i < pairs:
            if race is not None and race.should_stop(race_name, ratios, seed):
                break
        elif race is None or not race.extend(race_name, ratios, pairs, seed):
            break
    ratio, lo, hi = median_ci(ratios, seed=seed)
    if race is not None:  # the final interval replaces the running one in the race's bound
        race.hi[race_name] = hi
        race.pairs_taken[race_name] = len(ratios)
    out = {
        "ratio": ratio,
        "lo": lo,
        "hi": hi,
        "n_pairs": len(ratios),
        "ratios": ratios,
        "samples": samples,
        "peak_memory": peak,
        "stopped_early": len(ratios) < pairs,
        "extended": max(0, len(ratios) - pairs),
        "block": block_length(ratios),
        "stock_drift": stock_drift(samples),
    }
    if samples and all("cpu_s" in s for s in samples):
        # The same statistic over process CPU time (secondary; see workloads.py).
        by_pair = {}
        for s in samples:
            by_pair.setdefault(s["pair"], {})[s["arm"]] = s["cpu_s"]
        cpu_ratios = [p["stock"] / p["candidate"] for p in by_pair.values() if p["candidate"] > 0]
        if cpu_ratios:
            cpu_ratio, cpu_lo, cpu_hi = median_ci(cpu_ratios, seed=seed)
            out["cpu_time"] = {"ratio": cpu_ratio, "lo": cpu_lo, "hi": cpu_hi}
    return out


def stock_drift(samples):
    """How much the stock arm's median time moved between the first and second half of the pairs
    (second / first - 1): a machine that changed speed mid-measurement shows here, whatever the
    candidate does. Reported with every measurement; None under 4 pairs."""
    times = [s["seconds"] for s in samples if s["arm"] == "stock"]
    if len(times) < 4:
        return None
    half = len(times) // 2
    return float(np.median(times[half:]) / np.median(times[:half]) - 1.0)


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
    if len(parts) == 1:  # the one workload's own figures, not w * x / w (which can differ in the last bit)
        return {key: parts[0][1][key] for key in ("ratio", "lo", "hi")}
    total = sum(w for w, _ in parts)
    return {key: sum(w * r[key] for w, r in parts) / total for key in ("ratio", "lo", "hi")}
