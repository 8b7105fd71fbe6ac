#!/usr/bin/env python3
"""Does the promotion rule promote noise? Many short sessions through the real daemon and the real
promotion path (first measurement — raced and extended as in any session —, then the confirmation)
in which every candidate computes exactly what stock computes; count the sessions that promote
anything. Goal: at most 1 % of sessions, with the rate's own 95 % interval (Clopper-Pearson).

The A/A candidates (a fixed list of one per session, each in its own fresh TILEWISE_HOME so no
session's outcome sets another's bar; the models directory is shared):

  unmatched  a split rule for a shape the model does not have: the candidate arm is stock, exactly
  routed     a split whose tiles cover every matmul: native arithmetic routed through the plugin's
             patch on every linear (a little slower than stock: it may lose, it must not win)

  bench/integrity [--sessions 100] [--quick] [--out FILE]     (--quick: 8 sessions, the CI form; it
                                                               fails if any session promotes)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "evaluator"))

from tilewise import daemon_client  # noqa: E402

LINES: list = []
TARGET = {"device": "*", "model": "*", "mlx": "*", "backend": "*"}


def say(line=""):
    print(line, flush=True)
    LINES.append(line)


def aa_policy(kind, i):
    """An A/A candidate; `i` makes every session's policy its own (another name, another hash)."""
    if kind == "unmatched":
        rules = [{"n": [999983, 999983], "plan": {"kind": "split", "tile_m": None, "tile_n": 64, "tile_k": None}}]
    else:
        rules = [{"plan": {"kind": "split", "tile_m": 1 << 20, "tile_n": 1 << 20, "tile_k": 1 << 20}}]
    return {
        "schema": "tilewise.policy/1",
        "name": f"a/a {kind} {i}",
        "target": TARGET,
        "matmul": {"rules": rules, "default": {"kind": "native"}},
    }


def daemon_binary(given):
    """`given`, else this checkout's release build, else its debug build; exits when there is none."""
    daemon = (
        Path(given)
        if given
        else next((p for p in (REPO / "target/release/tilewised", REPO / "target/debug/tilewised") if p.exists()), None)
    )
    if daemon is None or not daemon.exists():
        sys.exit("no tilewised binary: cargo build -p tilewise --bins")
    return daemon


def clopper_pearson(k, n, level=0.95):
    """Exact binomial interval for k successes in n trials (bisection on the binomial tails)."""
    alpha = (1 - level) / 2

    def cdf(x, p):  # P(X <= x)
        return sum(math.comb(n, j) * p**j * (1 - p) ** (n - j) for j in range(x + 1))

    def solve(f, lo=0.0, hi=1.0):
        for _ in range(100):
            mid = (lo + hi) / 2
            if f(mid):
                hi = mid
            else:
                lo = mid
        return (lo + hi) / 2

    lower = 0.0 if k == 0 else solve(lambda p: 1 - cdf(k - 1, p) >= alpha)
    upper = 1.0 if k == n else solve(lambda p: cdf(k, p) <= alpha)
    return lower, upper


def one_session(daemon_bin, models_dir, kind, i, seed):
    home = Path(tempfile.mkdtemp(prefix="tw-aa-"))
    env = dict(
        os.environ,
        TILEWISE_MODELS_DIR=str(models_dir),
        TILEWISE_PYTHON=os.environ.get("TILEWISE_PYTHON", sys.executable),
    )
    try:
        with daemon_client.LocalDaemon(daemon_bin, home, env=env) as d:
            with d.client(timeout=300) as c:
                c.hello()
                started = c.call(
                    "tuning.start",
                    {"policies": [aa_policy(kind, i)], "seed": seed, "now": True, "budget": {"evaluations": 4}},
                )
            deadline = time.monotonic() + 900
            while True:
                with d.client(timeout=30) as c:
                    if c.status()["tuning"]["state"] == "idle":
                        shown = c.call("session.show", {"session_id": started["session_id"]})
                        history = c.call("history", {})
                        break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"session {i} did not end in 900 s")
                time.sleep(0.3)
    finally:
        shutil.rmtree(home, ignore_errors=True)
    s = shown["session"]
    measurements = [c.get("measurement") or {} for c in shown.get("candidates", [])]
    m = measurements[0] if measurements else {}
    return {
        "kind": kind,
        "i": i,
        "seed": seed,
        "state": s["state"],
        "promotions": len(history["promotions"]),
        "evaluations": s["evaluations"],
        "ratio": m.get("ratio"),
        "lo": m.get("lo"),
        "hi": m.get("hi"),
        "correct": m.get("correct"),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sessions", type=int, default=100)
    ap.add_argument("--quick", action="store_true", help="8 sessions; exit 1 if any promotes (CI)")
    ap.add_argument("--seed", type=int, default=1000)
    ap.add_argument("--daemon", default=None, help="tilewised binary (default: target/release, else target/debug)")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument(
        "--max-seconds", type=float, default=None, help="start no session after this long (a lent GPU's time)"
    )
    args = ap.parse_args()
    n = 8 if args.quick else args.sessions
    daemon = daemon_binary(args.daemon)
    models_dir = Path(os.environ.get("TILEWISE_MODELS_DIR") or tempfile.mkdtemp(prefix="tw-aa-models-"))
    say(
        f"# integrity {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}: {n} A/A sessions through {daemon}, "
        f"seeds {args.seed}.., load {os.getloadavg()[0]:.2f}"
    )
    rows, t0 = [], time.monotonic()
    for i in range(n):
        if args.max_seconds and time.monotonic() - t0 > args.max_seconds:
            say(f"stopped after {i} sessions: --max-seconds {args.max_seconds:.0f} spent")
            n = i
            break
        kind = "unmatched" if i % 4 != 3 else "routed"
        row = one_session(daemon, models_dir, kind, i, args.seed + i)
        rows.append(row)
        fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
        say(
            f"{i:4d} {kind:9s} {row['state']:9s} evaluations {row['evaluations']}  first {fmt(row['ratio'])} "
            f"[{fmt(row['lo'])}, {fmt(row['hi'])}]  promotions {row['promotions']}"
        )
    promoted = sum(1 for r in rows if r["promotions"] > 0)
    lo, hi = clopper_pearson(promoted, n)
    first_passed = sum(1 for r in rows if r["lo"] is not None and r["lo"] > 1.0)
    say(
        f"sessions that promoted: {promoted} of {n} = {promoted / n:.3f}, 95 % interval [{lo:.4f}, {hi:.4f}]; "
        f"first measurements with lo > 1: {first_passed} (each needed its confirmation); "
        f"{time.monotonic() - t0:.0f} s; load {os.getloadavg()[0]:.2f}"
    )
    say(
        f"goal: at most 1 % of sessions promote — {'met' if promoted / n <= 0.01 else 'NOT met'} "
        f"(the interval's upper end {hi:.3f} says how sure {n} sessions make it)"
    )
    if args.out:
        args.out.write_text("\n".join(LINES) + "\n\n" + json.dumps(rows, indent=1) + "\n")
    if args.quick and promoted:
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
