#!/usr/bin/env python3
"""Evaluations per hour: tilewise's persistent worker + shape memo versus a fresh Python process and
model load per candidate (OpenEvolve's way), on the same machine, in the same run.

Arm "tilewise": the real `tilewised` in a temp TILEWISE_HOME runs real search sessions, counted from
the `tuning.start` call to `session.finished` (so each includes the worker start and model load):
- cold: `--seconds`, empty memo — the session spends its start measuring shapes;
- warm: then `--warm-seconds` more with the next seed on the same daemon and database, memo kept —
  the steady state of a resident daemon that tunes session after session.
A candidate counts when the session reached a verdict on it: screened by the cost model (its
per-shape timings measured in the memo, predicted gain not surviving their intervals) or measured end
to end (correctness gate + interleaved stock/candidate pairs; a first evaluation races: a loser stops
once the upper bound of its interval is below 1.0 — counted, and shown separately). Pending
candidates at the end are not counted.

Arm "fresh process": for the first `--fresh` candidates the cold session measured end to end, each
one is evaluated the way the seed's OpenEvolve evaluator does it: start `python -m tilewise.worker`,
import, load the model, run `evaluate` with the same pairs/warmup (every pair, no racing), exit. Wall
time per candidate includes all of it.

The rates and their ratios are printed and written to bench/evals_per_hour.results.{json,md}, with
the end-to-end verdicts' rate alone (no credit for the memo), so the effects are visible separately.

Model: `synthetic:tiny` by default (Qwen2.5-0.5B's architecture at hidden 64, 2 layers). On a
2-core CPU box the fresh arm's per-candidate overhead is realistic at this size — a new interpreter,
`import mlx_lm` and the load take 1-2 s of its 3-4 s (imports and tokenizer, hardly the weights), and
that part barely grows with the model — while
every measurement (both arms) grows with it: `synthetic:qwen2.5-0.5b` generates about one token per
second here, so one evaluation takes minutes and a 4-minute session reaches a handful of verdicts.
A mid-size model would need a new synthetic config in evaluator/tilewise/models.py; `--model` takes
any local mlx_lm directory.

Usage: bench/evals_per_hour [--seconds 240] [--warm-seconds 240] [--fresh 4] [--pairs 6] [--warmup 1] [--seed 1]
"""

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def rpc(sock_path, method, params=None, timeout=60):
    """One JSON-RPC call on a fresh connection to the daemon."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.connect(str(sock_path))
    try:
        msg = {"jsonrpc": "2.0", "id": 1, "method": method}
        if params is not None:
            msg["params"] = params
        s.sendall((json.dumps(msg) + "\n").encode())
        buf = b""
        while b"\n" not in buf:
            chunk = s.recv(1 << 20)
            if not chunk:
                raise RuntimeError(f"{method}: connection closed")
            buf += chunk
        reply = json.loads(buf.split(b"\n", 1)[0])
    finally:
        s.close()
    if "error" in reply:
        raise RuntimeError(f"{method}: {reply['error']}")
    return reply["result"]


def worker_request(proc, req, timeout=900):
    proc.stdin.write(json.dumps(req) + "\n")
    proc.stdin.flush()
    deadline = time.time() + timeout
    while time.time() < deadline:
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"worker exited during {req['op']}")
        msg = json.loads(line)
        if msg.get("id") == req["id"] and msg.get("type") in ("result", "error"):
            if msg["type"] == "error":
                raise RuntimeError(f"{req['op']}: {msg['error']}")
            return msg["result"]
    raise RuntimeError(f"{req['op']}: timeout")


def fresh_process_evaluation(python, env, model, policy, pairs, warmup, seed):
    """OpenEvolve's way: a new interpreter and model load for one candidate."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [python, "-u", "-m", "tilewise.worker"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
    )
    try:
        ready = json.loads(proc.stdout.readline())
        assert ready.get("type") == "ready", ready
        worker_request(proc, {"id": 1, "op": "load", "model": model})
        r = worker_request(
            proc, {"id": 2, "op": "evaluate", "policy": policy, "pairs": pairs, "warmup": warmup, "seed": seed}
        )
        worker_request(proc, {"id": 3, "op": "shutdown"})
    finally:
        proc.stdin.close()
        proc.wait(timeout=60)
    return time.perf_counter() - t0, r


def run_session(sock, args, seconds, seed, label):
    """One tuning session of `seconds` on the running daemon; its verdict counts and rates."""
    print(f"arm tilewise ({label}): {seconds} s session (persistent worker + shape memo + cascade)", flush=True)
    t0 = time.perf_counter()
    started = rpc(
        sock,
        "tuning.start",
        {
            "model": args.model,
            "budget": {"seconds": seconds},
            "seed": seed,
            "pairs": args.pairs,
            "warmup": args.warmup,
            "shape_pairs": args.shape_pairs,
            "now": True,
        },
        timeout=600,
    )
    sid = started["session_id"]
    memo_before = rpc(sock, "session.show", {"session_id": sid})["memo_size"]
    while True:
        shown = rpc(sock, "session.show", {"session_id": sid})
        if shown["session"]["state"] in ("finished", "stopped", "failed"):
            break
        time.sleep(1)
    wall = time.perf_counter() - t0
    s = shown["session"]
    if s["state"] != "finished":
        raise SystemExit(f"session {sid} ended {s['state']}: {s.get('reason')}")
    candidates = shown["candidates"]
    # A verdict: measured (correct or not, raced or not) or failed. Re-measurements of the
    # incumbent are not candidates of their own and are not counted.
    end_to_end = [c for c in candidates if c["status"] in ("measured", "failed") and c["origin"] != "incumbent"]
    stopped = sum(1 for c in end_to_end if (c.get("measurement") or {}).get("stopped_early"))
    screened = shown["search"]["screened"]
    assessed = screened + len(end_to_end)
    r = {
        "label": label,
        "session_id": sid,
        "seconds": wall,
        "assessed": assessed,
        "screened": screened,
        "end_to_end": len(end_to_end),
        "stopped_early": stopped,
        "measurements": s["evaluations"],
        "promotions": s["promotions"],
        "memo_size_at_start": memo_before,
        "memo_size": shown["memo_size"],
        "shape_items": shown["search"]["shape_items"],
        "screen_bias": shown["search"].get("screen_bias"),
        "screen_bias_samples": shown["search"].get("screen_bias_samples"),
        "per_hour": assessed / wall * 3600,
        "end_to_end_per_hour": len(end_to_end) / wall * 3600,
        "candidates": candidates,
    }
    print(
        f"  {assessed} verdicts ({screened} screened, {len(end_to_end)} end to end of which {stopped} raced losers; "
        f"{s['evaluations']} measurements incl. confirmations; memo {memo_before} -> {shown['memo_size']}) "
        f"in {wall:.1f} s -> {r['per_hour']:.0f}/h",
        flush=True,
    )
    return r


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=int, default=240, help="length of the cold tilewise session")
    ap.add_argument(
        "--warm-seconds",
        type=int,
        default=240,
        help="length of a second session on the same daemon, memo kept (0: skip)",
    )
    ap.add_argument("--fresh", type=int, default=4, help="candidates evaluated the fresh-process way")
    ap.add_argument("--pairs", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--shape-pairs", type=int, default=5, help="pairs per shape microbenchmark (memo)")
    ap.add_argument("--model", default="synthetic:tiny")
    ap.add_argument("--out", default=str(ROOT / "bench" / "evals_per_hour.results"))
    args = ap.parse_args()

    python = os.environ.get("TILEWISE_PYTHON") or str(ROOT / ".venv" / "bin" / "python")
    # The release daemon when built (bench/evals_per_hour builds it); else the debug one. The daemon
    # only orchestrates (the measuring is Python in both arms), so this barely matters; it is recorded.
    daemon = ROOT / "target" / "release" / "tilewised"
    if not daemon.exists() or os.environ.get("TILEWISE_BENCH_DEBUG_DAEMON"):
        daemon = ROOT / "target" / "debug" / "tilewised"
    if not daemon.exists():
        subprocess.run(["cargo", "build", "--locked", "-q", "-p", "tilewise", "--bins"], cwd=ROOT, check=True)

    home = Path(tempfile.mkdtemp(prefix="tilewise-bench-"))
    (home / "config.toml").write_text(f'python = "{python}"\n\n[idle]\nenabled = false\n')
    env = dict(os.environ, TILEWISE_HOME=str(home))
    env.pop("TILEWISE_SOCKET", None)
    env.pop("TILEWISE_WORKER_FAULT", None)
    sock = home / "run" / "tilewised.sock"
    log = open(home / "tilewised.stderr.log", "w")
    proc = subprocess.Popen([str(daemon)], env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log)
    try:
        deadline = time.time() + 60
        while True:
            try:
                rpc(sock, "status", timeout=5)
                break
            except (OSError, RuntimeError) as e:
                if time.time() > deadline or proc.poll() is not None:
                    raise SystemExit(f"tilewised did not start; see {log.name}") from e
                time.sleep(0.1)
        # Synthesize the model once outside both arms (both would otherwise pay it once).
        fresh_process_evaluation(
            python, env, args.model, json.loads((ROOT / "schema" / "native.policy.json").read_text()), 2, 0, 0
        )

        cold = run_session(sock, args, args.seconds, args.seed, "cold: empty memo")
        warm = (
            run_session(sock, args, args.warm_seconds, args.seed + 1, "warm: memo of the cold session kept")
            if args.warm_seconds > 0
            else None
        )

        print(f"arm fresh process: {args.fresh} candidates, each a new interpreter + model load + evaluate", flush=True)
        end_to_end = [c for c in cold["candidates"] if c["status"] in ("measured", "failed")]
        policies = [c["policy"] for c in end_to_end] or [c["policy"] for c in cold["candidates"]]
        while len(policies) < args.fresh:
            policies = policies + policies
        times = []
        for i, pol in enumerate(policies[: args.fresh]):
            dt, r = fresh_process_evaluation(python, env, args.model, pol, args.pairs, args.warmup, args.seed + i)
            times.append(dt)
            print(
                f"  candidate {i}: {dt:.1f} s (ratio {r.get('combined', {}).get('ratio') if r.get('combined') else None})",
                flush=True,
            )
        fresh_rate = len(times) / sum(times) * 3600
        rows = [r for r in (cold, warm) if r is not None]
        for r in rows:
            r["ratio"] = r["per_hour"] / fresh_rate
            r["ratio_end_to_end_only"] = r["end_to_end_per_hour"] / fresh_rate
            print(
                f"{r['label']}: {r['per_hour']:.0f}/h = {r['ratio']:.1f}x fresh ({fresh_rate:.0f}/h); "
                f"end-to-end verdicts alone {r['end_to_end_per_hour']:.0f}/h = {r['ratio_end_to_end_only']:.1f}x"
            )
        result = {
            "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "loadavg_at_end": os.getloadavg()},
            "settings": dict(vars(args), daemon=str(daemon.relative_to(ROOT))),
            "tilewise_cold": {k: v for k, v in cold.items() if k != "candidates"},
            "tilewise_warm": {k: v for k, v in warm.items() if k != "candidates"} if warm else None,
            "fresh_process": {"seconds_each": times, "per_hour": fresh_rate},
            "ratio_cold": cold["ratio"],
            "ratio_warm": warm["ratio"] if warm else None,
            "goal": 20.0,
        }
        Path(args.out + ".json").write_text(json.dumps(result, indent=2) + "\n")
        env_prefix = "TILEWISE_BENCH_DEBUG_DAEMON=1 " if os.environ.get("TILEWISE_BENCH_DEBUG_DAEMON") else ""
        cmd = (
            f"{env_prefix}bench/evals_per_hour --seconds {args.seconds} --warm-seconds {args.warm_seconds} --fresh {args.fresh} "
            f"--pairs {args.pairs} --warmup {args.warmup} --model {args.model}"
        )
        md = [
            "# evals_per_hour results",
            "",
            f"Run {result['when']} on {result['machine']['platform']}, {result['machine']['cpus']} CPUs "
            f"(load average at end {result['machine']['loadavg_at_end'][0]:.1f}; the machine is shared), model {args.model}, "
            f"pairs {args.pairs}, warmup {args.warmup}, shape pairs {args.shape_pairs}, daemon `{daemon.relative_to(ROOT)}`. "
            f"Command: `{cmd}`.",
            "",
            "A verdict is a candidate the session resolved: screened by the cost model (predicted loser from "
            "measured shape timings), or measured end to end (correctness gate + interleaved pairs; a raced "
            "loser stopped once its upper bound fell below 1.0 counts, flagged). Candidates still pending "
            "when the budget ran out are not counted.",
            "",
            "| arm | verdicts | screened | end to end (raced losers) | wall s | verdicts per hour | vs fresh |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
            f"| fresh process + model load per candidate (OpenEvolve's way) | {len(times)} | - | {len(times)} (0) | "
            f"{sum(times):.1f} | {fresh_rate:.0f} | 1.0x |",
        ]
        for r in rows:
            md.append(
                f"| tilewise, {r['label']} | {r['assessed']} | {r['screened']} | {r['end_to_end']} ({r['stopped_early']}) "
                f"| {r['seconds']:.1f} | {r['per_hour']:.0f} | **{r['ratio']:.1f}x** |"
            )
        for r in rows:
            md.append(
                f"| tilewise, {r['label']}: end-to-end verdicts only | {r['end_to_end']} | - | {r['end_to_end']} "
                f"({r['stopped_early']}) | {r['seconds']:.1f} | {r['end_to_end_per_hour']:.0f} | "
                f"{r['ratio_end_to_end_only']:.1f}x |"
            )
        md += [
            "",
            "What the verdicts rest on: a screened verdict is the cost model's prediction from measured "
            "shape timings, taken down by the session's learned overstatement (median predicted - measured "
            "of its end-to-end runs) — not an end-to-end measurement.",
        ]
        for r in rows:
            md.append(
                f"- {r['label']}: {100 * r['screened'] / max(r['assessed'], 1):.1f} % of verdicts screened; learned "
                f"overstatement at the end {r['screen_bias']:.3f} (from {r['screen_bias_samples']} end-to-end runs); "
                f"{r['shape_items']} shape microbenchmarks; {r['promotions']} promotions."
            )
        best = max(r["ratio"] for r in rows)
        md += [
            "",
            f"Goal >= 20x: {'met' if best >= 20 else 'NOT met'} (cold {cold['ratio']:.1f}x"
            + (f", warm {warm['ratio']:.1f}x" if warm else "")
            + ").",
            "",
        ]
        Path(args.out + ".md").write_text("\n".join(md))
        print(f"wrote {args.out}.json and {args.out}.md")
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


if __name__ == "__main__":
    sys.exit(main())
