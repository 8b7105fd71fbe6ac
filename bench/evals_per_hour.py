#!/usr/bin/env python3
"""Evaluations per hour: tilewise's persistent worker + shape memo versus a fresh Python process and
model load per candidate (OpenEvolve's way), on the same machine, in the same run.

Arm "tilewise": the real release `tilewised` in a temp TILEWISE_HOME runs a real search session for
`--seconds` (cold: empty memo, model synthesized/loaded by the worker, everything counted from the
`tuning.start` call to `session.finished`). A candidate counts as evaluated when the session reached a
verdict on it: screened by the cost model (its per-shape timings measured in the memo) or measured
end to end (interleaved stock/candidate pairs + correctness gate).

Arm "fresh process": for the first `--fresh` candidates the session produced, each one is evaluated
the way the seed's OpenEvolve evaluator does it: start `python -m tilewise.worker`, load the model,
run `evaluate` with the same pairs/warmup, exit. Wall time per candidate includes all of it.

Both rates and their ratio are printed and written to bench/evals_per_hour.results.{json,md}.
The end-to-end rate of the persistent worker alone (no memo) is reported too, so the two effects are
visible separately.

Usage: bench/evals_per_hour [--seconds 240] [--fresh 4] [--pairs 6] [--warmup 1] [--seed 1]
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
    proc = subprocess.Popen([python, "-u", "-m", "tilewise.worker"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, env=env)
    try:
        ready = json.loads(proc.stdout.readline())
        assert ready.get("type") == "ready", ready
        worker_request(proc, {"id": 1, "op": "load", "model": model})
        r = worker_request(proc, {"id": 2, "op": "evaluate", "policy": policy, "pairs": pairs, "warmup": warmup,
                                  "seed": seed})
        worker_request(proc, {"id": 3, "op": "shutdown"})
    finally:
        proc.stdin.close()
        proc.wait(timeout=60)
    return time.perf_counter() - t0, r


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=int, default=240, help="length of the tilewise session")
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
            except (OSError, RuntimeError):
                if time.time() > deadline or proc.poll() is not None:
                    raise SystemExit(f"tilewised did not start; see {log.name}")
                time.sleep(0.1)
        # Synthesize the model once outside both arms (both would otherwise pay it once).
        fresh_process_evaluation(python, env, args.model, json.loads((ROOT / "schema" / "native.policy.json").read_text()),
                                 2, 0, 0)

        print(f"arm tilewise: {args.seconds} s session (persistent worker + shape memo + cascade)", flush=True)
        t0 = time.perf_counter()
        started = rpc(sock, "tuning.start", {"model": args.model, "budget": {"seconds": args.seconds}, "seed": args.seed,
                                             "pairs": args.pairs, "warmup": args.warmup, "shape_pairs": args.shape_pairs,
                                             "now": True}, timeout=600)
        sid = started["session_id"]
        while True:
            shown = rpc(sock, "session.show", {"session_id": sid})
            if shown["session"]["state"] in ("finished", "stopped", "failed"):
                break
            time.sleep(1)
        t_tilewise = time.perf_counter() - t0
        s = shown["session"]
        candidates = shown["candidates"]
        end_to_end = [c for c in candidates if c["status"] in ("measured", "failed")]
        screened = shown["search"]["screened"]
        assessed = screened + len(end_to_end)
        measurements = s["evaluations"]
        tilewise_rate = assessed / t_tilewise * 3600
        e2e_rate = measurements / t_tilewise * 3600
        print(f"  {assessed} candidates assessed ({screened} screened by the memo, {len(end_to_end)} end to end, "
              f"{measurements} measurements incl. confirmations) in {t_tilewise:.1f} s -> {tilewise_rate:.0f}/h", flush=True)

        print(f"arm fresh process: {args.fresh} candidates, each a new interpreter + model load + evaluate", flush=True)
        policies = [c["policy"] for c in end_to_end] or [c["policy"] for c in candidates]
        while len(policies) < args.fresh:
            policies = policies + policies
        times = []
        for i, pol in enumerate(policies[: args.fresh]):
            dt, r = fresh_process_evaluation(python, env, args.model, pol, args.pairs, args.warmup, args.seed + i)
            times.append(dt)
            print(f"  candidate {i}: {dt:.1f} s (ratio {r.get('combined', {}).get('ratio') if r.get('combined') else None})",
                  flush=True)
        fresh_rate = len(times) / sum(times) * 3600
        ratio = tilewise_rate / fresh_rate
        e2e_ratio = e2e_rate / fresh_rate
        print(f"\nfresh process: {fresh_rate:.0f}/h   tilewise: {tilewise_rate:.0f}/h   ratio {ratio:.1f}x (goal >= 20x)")
        print(f"end-to-end measurements alone (persistent worker, no memo credit): {e2e_rate:.0f}/h = {e2e_ratio:.1f}x")
        result = {
            "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "loadavg_at_end": os.getloadavg()},
            "settings": dict(vars(args), daemon=str(daemon.relative_to(ROOT))),
            "tilewise": {"seconds": t_tilewise, "assessed": assessed, "screened": screened, "end_to_end": len(end_to_end),
                         "measurements": measurements, "promotions": s["promotions"], "memo_size": shown["memo_size"],
                         "per_hour": tilewise_rate, "measurements_per_hour": e2e_rate},
            "fresh_process": {"seconds_each": times, "per_hour": fresh_rate},
            "ratio": ratio,
            "ratio_end_to_end_only": e2e_ratio,
            "goal": 20.0,
            "goal_met": ratio >= 20.0,
        }
        Path(args.out + ".json").write_text(json.dumps(result, indent=2) + "\n")
        md = [
            "# evals_per_hour results",
            "",
            f"Run {result['when']} on {result['machine']['platform']}, {result['machine']['cpus']} CPUs "
            f"(load average at end {result['machine']['loadavg_at_end'][0]:.1f}; the machine is shared), model {args.model}, "
            f"pairs {args.pairs}, warmup {args.warmup}, daemon `{daemon.relative_to(ROOT)}`. Command: `bench/evals_per_hour --seconds {args.seconds} --fresh {args.fresh}`.",
            "",
            "| arm | candidates | wall s | per hour |",
            "| --- | ---: | ---: | ---: |",
            f"| fresh process + model load per candidate (OpenEvolve's way) | {len(times)} | {sum(times):.1f} | {fresh_rate:.0f} |",
            f"| tilewise: persistent worker + memo cascade (cold start) | {assessed} ({screened} screened, {len(end_to_end)} end to end) | {t_tilewise:.1f} | {tilewise_rate:.0f} |",
            f"| tilewise end-to-end measurements only | {measurements} | {t_tilewise:.1f} | {e2e_rate:.0f} |",
            "",
            f"**Ratio: {ratio:.1f}x** (goal >= 20x: {'met' if ratio >= 20 else 'NOT met'}); end-to-end only: {e2e_ratio:.1f}x.",
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
