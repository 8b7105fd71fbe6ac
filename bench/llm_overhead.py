#!/usr/bin/env python3
"""What an LLM endpoint that answers garbage costs the search: tuning sessions on the real daemon with
`llm: true` against a local endpoint that answers every request with prose (nothing usable), next to
the same sessions without the LLM, alternated; each in its own fresh TILEWISE_HOME (same cold shape
memo), same seed, same time budget. Throughput = the search's verdicts per minute (end-to-end trials +
candidates screened by the cost model). Goal: within 10 % of the sessions without the LLM.

  .venv/bin/python bench/llm_overhead.py [--seconds 60] [--rounds 2] [--delay-s 2] [--out FILE]

`--delay-s` makes the endpoint take that long per answer (a slow local model).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "evaluator"))

from tilewise import daemon_client  # noqa: E402

LINES: list = []


def say(line=""):
    print(line, flush=True)
    LINES.append(line)


def garbage_endpoint(delay_s):
    """A chat-completions endpoint on 127.0.0.1 that answers prose (no JSON, no code). Returns
    (url, request counter, server)."""
    count = [0]

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            count[0] += 1
            time.sleep(delay_s)
            body = json.dumps(
                {
                    "choices": [
                        {"message": {"role": "assistant", "content": "I think you should try larger tiles, maybe."}}
                    ]
                }
            ).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_address[1]}/v1", count, server


def session(daemon_bin, seconds, seed, llm_url):
    """One session in a fresh home; returns its figures."""
    home = Path(tempfile.mkdtemp(prefix="tw-llm-"))
    if llm_url:
        (home / "config.toml").write_text(f'[llm]\nendpoint = "{llm_url}"\nmodel = "default_model"\n')
    env = dict(os.environ, TILEWISE_PYTHON=os.environ.get("TILEWISE_PYTHON", sys.executable))
    with daemon_client.LocalDaemon(daemon_bin, home, env=env) as d:
        with d.client(timeout=120) as c:
            c.hello()
            started = c.call(
                "tuning.start", {"budget": {"seconds": seconds}, "seed": seed, "now": True, "llm": bool(llm_url)}
            )
        while True:
            with d.client(timeout=30) as c:
                if c.status()["tuning"]["state"] == "idle":
                    shown = c.call("session.show", {"session_id": started["session_id"]})
                    break
            time.sleep(0.5)
    s, search = shown["session"], shown.get("search") or {}
    verdicts = s["evaluations"] + s["failures"] + search.get("screened", 0)
    return {
        "llm": bool(llm_url),
        "evaluations": s["evaluations"],
        "failures": s["failures"],
        "screened": search.get("screened", 0),
        "verdicts_per_min": verdicts * 60.0 / seconds,
        "generation": search.get("generation"),
        "llm_stats": search.get("llm"),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=int, default=60)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--delay-s", type=float, default=2.0)
    ap.add_argument("--daemon", default=str(REPO / "target" / "release" / "tilewised"))
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    if not Path(args.daemon).exists():
        sys.exit(f"{args.daemon} not found: cargo build --release -p tilewise --bins")
    url, count, server = garbage_endpoint(args.delay_s)
    say(
        f"# llm_overhead {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}: {args.rounds} rounds x (llm, none), "
        f"{args.seconds} s sessions, seed {args.seed}, endpoint answers prose after {args.delay_s} s; "
        f"load {os.getloadavg()[0]:.2f}"
    )
    rows = []
    for r in range(args.rounds):
        order = (url, None) if r % 2 == 0 else (None, url)
        for llm in order:
            before = count[0]
            row = session(args.daemon, args.seconds, args.seed, llm)
            row["endpoint_requests"] = count[0] - before
            rows.append(row)
            st = row["llm_stats"] or {}
            say(
                f"round {r} {'llm ' if row['llm'] else 'none'}: {row['verdicts_per_min']:.1f} verdicts/min "
                f"({row['evaluations']} trials, {row['screened']} screened, generation {row['generation']}); "
                f"requests {st.get('requests', 0)}, refused {st.get('refused', {})}, abandoned {st.get('abandoned', 0)}"
            )
    server.shutdown()
    with_llm = [r["verdicts_per_min"] for r in rows if r["llm"]]
    without = [r["verdicts_per_min"] for r in rows if not r["llm"]]
    ratio = statistics.median(with_llm) / statistics.median(without)
    say(
        f"median verdicts/min: with the garbage endpoint {statistics.median(with_llm):.1f}, without "
        f"{statistics.median(without):.1f}: ratio {ratio:.3f} (goal >= 0.90); load {os.getloadavg()[0]:.2f}"
    )
    if args.out:
        args.out.write_text("\n".join(LINES) + "\n\n" + json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
