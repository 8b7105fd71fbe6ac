"""The measuring instrument itself: interleaving, bootstrap intervals, combination, cancellation."""

import time

import numpy as np
import pytest

from tilewise import measure


def sleeper(seconds, log, name):
    def run():
        log.append(name)
        t = time.perf_counter()
        time.sleep(seconds)
        return {"seconds": time.perf_counter() - t}
    return run


def test_arms_alternate_which_goes_first_and_every_sample_is_kept():
    log = []
    r = measure.interleaved({"stock": sleeper(0.001, log, "s"), "candidate": sleeper(0.001, log, "c")},
                            pairs=4, warmup=2)
    assert log == ["s", "c", "c", "s"] + ["s", "c", "c", "s", "s", "c", "c", "s"]
    assert [(s["pair"], s["arm"]) for s in r["samples"]] == [
        (0, "stock"), (0, "candidate"), (1, "candidate"), (1, "stock"),
        (2, "stock"), (2, "candidate"), (3, "candidate"), (3, "stock")]
    assert r["n_pairs"] == 4 and len(r["ratios"]) == 4
    assert set(r["peak_memory"]) == {"stock", "candidate"}


def test_a_real_difference_is_detected_with_a_tight_interval():
    """Candidate sleeps twice as long: ratio ~0.5, and the interval excludes 1.0."""
    log = []
    r = measure.interleaved({"stock": sleeper(0.010, log, "s"), "candidate": sleeper(0.020, log, "c")},
                            pairs=8, warmup=1)
    assert r["hi"] < 1.0
    assert 0.3 < r["ratio"] < 0.8  # 0.5 plus sleep overshoot on a loaded machine
    assert r["lo"] <= r["ratio"] <= r["hi"]


def test_median_ci_is_seeded_and_brackets_the_median():
    rng = np.random.default_rng(1)
    x = rng.normal(1.0, 0.05, size=30)
    a, b = measure.median_ci(x, seed=7), measure.median_ci(x, seed=7)
    assert a == b
    med, lo, hi = a
    assert med == pytest.approx(float(np.median(x)))
    assert lo < med < hi and hi - lo < 0.1
    assert measure.median_ci([1.2]) == (1.2, 1.2, 1.2)
    with pytest.raises(ValueError):
        measure.median_ci([])


def test_combined_is_weighted_seventy_thirty():
    inf = {"ratio": 1.1, "lo": 1.0, "hi": 1.2}
    trn = {"ratio": 0.9, "lo": 0.8, "hi": 1.0}
    c = measure.combine(inf, trn)
    assert c["ratio"] == pytest.approx(0.7 * 1.1 + 0.3 * 0.9)
    assert c["lo"] == pytest.approx(0.7 * 1.0 + 0.3 * 0.8)
    assert c["hi"] == pytest.approx(0.7 * 1.2 + 0.3 * 1.0)
    assert measure.combine(None, trn) == pytest.approx(trn)
    assert measure.combine(inf, None) == pytest.approx(inf)
    assert measure.combine(None, None) is None


def test_cancel_stops_at_a_sample_boundary():
    log = []
    calls = iter(range(100))
    with pytest.raises(measure.Cancelled):
        measure.interleaved({"stock": sleeper(0, log, "s"), "candidate": sleeper(0, log, "c")},
                            pairs=10, warmup=0, should_stop=lambda: next(calls) >= 3)
    assert len(log) == 3
