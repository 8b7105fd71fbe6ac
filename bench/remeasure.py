#!/usr/bin/env python3
"""How far does a promoted policy's re-measurement land from the figure it was promoted with?
Short default sessions through the real daemon, each in a fresh TILEWISE_HOME (so every session
promotes from native): the session's promotion, its re-measurement in a fresh worker right after,
and — with --later-day — a second daemon process on the same home running the re-measurement-only
session the idle auto-starter runs on a later day. Goal: for promoted effects above 10 %, re-measured
medians within ±2 % of the promoted median.

  bench/remeasure.py --model synthetic:qwen2.5-0.5b --dtype bfloat16 --sessions 2 --later-day --out FILE
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "evaluator"))

from integrity import daemon_binary  # noqa: E402

from tilewise import daemon_client  # noqa: E402

LINES: list = []
EFFECT_FLOOR = 0.10  # the goal covers promoted effects above 10 %
GOAL = 0.02  # re-measured median within ±2 % of the promoted one


def say(line=""):
    print(line, flush=True)
    LINES.append(line)


def save(out, rows):
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("\n".join(LINES) + "\n\n" + json.dumps(rows, indent=1) + "\n")


def run_session(d, params, timeout_s):
    """Starts a session with `params`, waits until the daemon is idle again; the session as shown."""
    with d.client(timeout=300) as c:
        c.hello()
        started = c.call("tuning.start", {"now": True, **params})
    deadline = time.monotonic() + timeout_s
    while True:
        with d.client(timeout=30) as c:
            if c.status()["tuning"]["state"] == "idle":
                return c.call("session.show", {"session_id": started["session_id"]})
        if time.monotonic() > deadline:
            raise RuntimeError(f"session {started['session_id']} did not end in {timeout_s} s")
        time.sleep(0.5)


def history(d):
    with d.client(timeout=30) as c:
        return c.call("history", {})["promotions"]


def interval(part):
    return [part["ratio"], part["lo"], part["hi"]] if part else None


def measurements(db_path, hash_):
    """Every stored measurement of `hash_` with its per-workload figures, oldest first: the first
    measurement, its confirmation, then each re-measurement."""
    db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    try:
        rows = db.execute(
            "SELECT m.id, c.origin, m.ratio, m.detail_json FROM measurements m JOIN candidates c ON c.id = m.candidate_id"
            " WHERE c.hash = ? ORDER BY m.id",
            (hash_,),
        ).fetchall()
    finally:
        db.close()
    out = []
    for mid, origin, ratio, detail in rows:
        d = json.loads(detail)
        out.append(
            {
                "id": mid,
                "origin": origin,
                "combined": ratio,
                "inference": interval(d.get("inference")),
                "training": interval(d.get("training")),
            }
        )
    return out


def one_home(daemon_bin, env, args, model, seed, workload):
    """One fresh home: a search session, then (optionally) a later-day re-measurement."""
    home = Path(tempfile.mkdtemp(prefix="tw-remeasure-"))
    base = {"model": model, **({"dtype": args.dtype} if args.dtype else {})}
    if workload is not None:
        base["workload"] = workload
    row = {"model": model, "seed": seed, "workload": workload}
    try:
        with daemon_client.LocalDaemon(daemon_bin, home, env=env) as d:
            shown = run_session(d, {**base, "seed": seed, "budget": {"evaluations": args.evaluations}}, args.timeout)
            s = shown["session"]
            row.update(session_state=s["state"], evaluations=s["evaluations"])
            row["measured"] = [
                {k: (c.get("measurement") or {}).get(k) for k in ("ratio", "lo", "hi")} | {"origin": c.get("origin")}
                for c in shown.get("candidates", [])
                if c.get("measurement")
            ]
            entries = history(d)
        if args.later_day and any(e["kind"] == "promotion" for e in entries):
            with daemon_client.LocalDaemon(daemon_bin, home, env=env) as d:
                row["later_day_state"] = run_session(d, {**base, "remeasure": True}, args.timeout)["session"]["state"]
                entries = history(d)
        promoted = [e["hash"] for e in entries if e["kind"] == "promotion"]
        if promoted:
            row["measurements"] = measurements(home / "tilewise.db", promoted[0])
    finally:
        shutil.rmtree(home, ignore_errors=True)
    entries = sorted(entries, key=lambda e: e["id"])
    promotions = [e for e in entries if e["kind"] == "promotion"]
    row["history"] = [{k: e.get(k) for k in ("id", "kind", "hash", "ratio", "lo", "hi", "reason")} for e in entries]
    if not promotions:
        return row
    p = promotions[0]
    row["promoted"] = [p["ratio"], p["lo"], p["hi"]]
    again = [e for e in entries if e["kind"] == "remeasure" and e["hash"] == p["hash"]]
    row["remeasured"] = [{"ratio": e["ratio"], "lo": e["lo"], "hi": e["hi"], "reason": e.get("reason")} for e in again]
    row["demoted"] = any(e["kind"] == "demotion" for e in entries)
    return row


def summarize(rows, workload):
    label = "default workload" if workload is None else json.dumps(workload, separators=(",", ":"))
    devs = [
        m["ratio"] / row["promoted"][0] - 1
        for row in rows
        if "promoted" in row and row["promoted"][0] > 1 + EFFECT_FLOOR
        for m in row["remeasured"]
    ]
    if not devs:
        say(f"{label}: no promoted effect above {EFFECT_FLOOR:.0%}: the ±{GOAL:.0%} goal is not measured")
        return
    within = sum(abs(d) <= GOAL for d in devs)
    say(
        f"{label}: re-measurements of effects above {EFFECT_FLOOR:.0%}: {len(devs)}; deviation of the median: "
        f"median {100 * statistics.median(devs):+.1f} %, range [{100 * min(devs):+.1f}, {100 * max(devs):+.1f}] %; "
        f"within ±{GOAL:.0%}: {within} of {len(devs)}"
    )
    # How much each workload's ratio moves between measurements of the same policy (max - min over
    # the mean, per home): which workload carries the spread.
    for w in ("inference", "training"):
        spreads = []
        for row in rows:
            xs = [m[w][0] for m in row.get("measurements", []) if m[w]]
            if len(xs) >= 2:
                spreads.append((max(xs) - min(xs)) / statistics.fmean(xs))
        if spreads:
            say(
                f"    {w}: spread between measurements of one policy, per home: "
                + ", ".join(f"{100 * x:.1f} %" for x in spreads)
            )


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", action="append", help="repeatable (default synthetic:tiny)")
    ap.add_argument("--dtype", default=None)
    ap.add_argument(
        "--workload",
        action="append",
        type=json.loads,
        help="a tuning.start workload (JSON); repeat to alternate them across homes (an A/B in one run)",
    )
    ap.add_argument("--sessions", type=int, default=3, help="fresh homes per model")
    ap.add_argument("--evaluations", type=int, default=2, help="session budget: the seed and its confirmation")
    ap.add_argument("--later-day", action="store_true", help="also run the later-day re-measurement session")
    ap.add_argument("--seed", type=int, default=7000)
    ap.add_argument("--timeout", type=float, default=900, help="per session, seconds")
    ap.add_argument("--max-seconds", type=float, default=None, help="start no session after this long")
    ap.add_argument("--daemon", default=None, help="tilewised binary (default: target/release, else target/debug)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    models = args.model or ["synthetic:tiny"]
    daemon = daemon_binary(args.daemon)
    env = dict(
        os.environ,
        TILEWISE_MODELS_DIR=os.environ.get("TILEWISE_MODELS_DIR") or tempfile.mkdtemp(prefix="tw-remeasure-models-"),
        TILEWISE_PYTHON=os.environ.get("TILEWISE_PYTHON", sys.executable),
    )
    say(
        f"# remeasure {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}: {args.sessions} fresh homes per model, "
        f"budget {args.evaluations} evaluations{', then a later-day session' if args.later_day else ''}; "
        f"{daemon}; load {os.getloadavg()[0]:.2f}"
    )
    say("model                       seed  promoted                  re-measured (deviation of the median)")
    workloads = args.workload or [None]
    rows, t0 = [], time.monotonic()
    for i in range(args.sessions):
        for model in models:
            if args.max_seconds and time.monotonic() - t0 > args.max_seconds:
                say(f"stopped: --max-seconds {args.max_seconds:.0f} spent")
                break
            workload = workloads[i % len(workloads)]
            row = one_home(daemon, env, args, model, args.seed + i, workload)
            rows.append(row)
            save(args.out, rows)  # a lent GPU's call may be cut off: keep what is measured so far
            if "promoted" not in row:
                tried = ", ".join(
                    f"{m['origin']} {m['ratio']:.3f} [{m['lo']:.3f}, {m['hi']:.3f}]" for m in row["measured"]
                )
                say(f"{model:27s} {row['seed']:5d}  nothing promoted ({row.get('session_state')}): {tried}")
                continue
            r, lo, hi = row["promoted"]
            again = "  ".join(
                f"{m['ratio']:.3f} [{m['lo']:.3f}, {m['hi']:.3f}] ({100 * (m['ratio'] / r - 1):+.1f} %)"
                for m in row["remeasured"]
            )
            say(
                f"{model:27s} {row['seed']:5d}  {r:.3f} [{lo:.3f}, {hi:.3f}]  {again}{'  DEMOTED' if row['demoted'] else ''}"
            )
        else:
            continue
        break
    promoted = sum("promoted" in r for r in rows)
    say(f"sessions {len(rows)}, promoted {promoted}; {time.monotonic() - t0:.0f} s")
    for workload in workloads:
        summarize([r for r in rows if r["workload"] == workload], workload)
    save(args.out, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
