"""What the mlx_lm plugin costs a user's process, measured side by side in one run.

1. Policy fetch latency: the plugin's whole daemon path (connect, `hello`, `status`, `policy.get`,
   validation and content hash, cache write) against a real `tilewised` holding a stored best policy,
   vs the offline path (read the cached file, parse, validate, re-hash). Alternated fetch by fetch.
2. Generation overhead vs stock mlx_lm, as the median of per-pair ratios stock_time / candidate_time
   with a bootstrap 95 % interval (tilewise.measure.interleaved: warmups, alternating order, GC
   paused), wall and process-CPU time. Goal: >= 0.99. Two candidates: (a) the plugin with the native
   policy in force — what users get when nothing is proven (it leaves the model stock, so this is an
   A/A check of the measurement); (b) the native policy forced through the patch on every linear —
   the dispatch machinery's cost, the floor any policy touching every layer pays.
3. Per-call dispatch overhead on one linear layer (patched native vs stock), which predicts (2) for any
   model: overhead per token = calls per token x this.
4. The usage recorder's cost per forward call (tilewise.usage's hook, on in (2a)): one per token.

Usage:
  python bench/plugin_bench.py [--model synthetic:tiny] [--dtype float32] [--pairs 60]
                               [--prompt-tokens 64] [--gen-tokens 16] [--fetches 300]
                               [--daemon target/debug/tilewised | --no-daemon] [--out results/cpu/plugin-bench.txt]
On a GPU (the H100 figure): `bash bench/gpu/run-h100.sh plugin` on the lent machine runs
  python bench/plugin_bench.py --model synthetic:qwen2.5-0.5b --dtype bfloat16 --prompt-tokens 512
    --gen-tokens 64 --pairs 40 --no-daemon --out $OUT/plugin-bench.txt
(--no-daemon skips part 1 where no tilewised binary is built; parts 2-3 need only Python. On a GPU
read the wall-clock ratios: process CPU time there is only the host's side.)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "evaluator"))

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402

from tilewise import daemon_client, measure, models, patch, plugin, usage, workloads  # noqa: E402
from tilewise import policy as P  # noqa: E402

LINES: list = []


def say(line: str = "") -> None:
    print(line, flush=True)
    LINES.append(line)


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def us(x):
    return f"{x * 1e6:8.1f} µs"


# ---------------------------------------------------------------------------------------------
# 1. fetch latency


def seed_best_binary() -> Path:
    """daemon/examples/seed_best.rs (stores a best through the real store), built if missing."""
    exe = REPO / "target" / "debug" / "examples" / "seed_best"
    if not exe.is_file():
        subprocess.run(
            ["cargo", "build", "--locked", "-q", "-p", "tilewise", "--example", "seed_best"], cwd=REPO, check=True
        )
    return exe


def fetch_latency(args, model) -> dict:
    binary = Path(args.daemon) if args.daemon else daemon_client.find_daemon_binary()
    if binary is None:
        raise SystemExit(
            "no tilewised binary: build it (cargo build -p tilewise --bins) or pass --daemon / --no-daemon"
        )
    home = Path(tempfile.mkdtemp(prefix="tw-bench-"))  # short: AF_UNIX paths are limited to ~104 bytes
    os.environ["TILEWISE_HOME"] = str(home)
    os.environ.pop("TILEWISE_SOCKET", None)
    target = plugin.this_target(model)
    with daemon_client.LocalDaemon(binary, home) as d:
        doc = P.make_policy(
            [{"m": [1, 16], "plan": {"kind": "native"}}, {"n": [1000, None], "plan": P.split_plan(None, 256, None)}],
            target=dict(target, device=d.device_fingerprint),
            name="bench best",
        )
        (home / "best.json").write_text(json.dumps(doc))
        subprocess.run([str(seed_best_binary()), str(home / "best.json")], check=True, capture_output=True)
        key = (target["model"], target["mlx"], target["backend"])
        first = plugin._from_daemon(target, timeout=2.0)
        assert first.source == "daemon" and first.policy is not None, first.reason
        daemon_s, cache_s, raw_s = [], [], []
        for _ in range(args.fetches):
            t0 = time.perf_counter()
            r = plugin._from_daemon(target, timeout=2.0)
            t1 = time.perf_counter()
            entry, problem = plugin._read_cache(key)
            t2 = time.perf_counter()
            with daemon_client.DaemonClient(timeout=2.0) as c:
                c.policy_get(target["model"], target["mlx"], target["backend"])
            t3 = time.perf_counter()
            assert r.source == "daemon" and entry is not None, (r.reason, problem)
            daemon_s.append(t1 - t0)
            cache_s.append(t2 - t1)
            raw_s.append(t3 - t2)
    shutil.rmtree(home, ignore_errors=True)
    say("## 1. policy fetch latency (real tilewised, stored best; alternated, %d each)" % args.fetches)
    say(
        f"  plugin daemon path (connect+hello+status+policy.get+validate+cache upkeep): "
        f"median {us(statistics.median(daemon_s))}  p99 {us(pct(daemon_s, 0.99))}"
    )
    say(
        f"  one bare policy.get round trip (connect+request+reply):                     "
        f"median {us(statistics.median(raw_s))}  p99 {us(pct(raw_s, 0.99))}"
    )
    say(
        f"  plugin cache path (read file+parse+validate+re-hash):                        "
        f"median {us(statistics.median(cache_s))}  p99 {us(pct(cache_s, 0.99))}"
    )
    say(
        f"  daemon / cache median ratio: {statistics.median(daemon_s) / statistics.median(cache_s):.2f}x"
        f"   (timeout budget: {daemon_client.DEFAULT_TIMEOUT_S * 1e3:.0f} ms)"
    )
    return {"daemon_s": daemon_s, "cache_s": cache_s, "raw_policy_get_s": raw_s}


# ---------------------------------------------------------------------------------------------
# 2. generation overhead of the native policy vs stock


def _compare(args, model, label, setup_candidate) -> dict:
    """stock vs `setup_candidate(model)` in interleaved pairs; prints and returns ratio + interval."""
    prompt = workloads.token_ids(workloads.vocab_size(model), args.prompt_tokens, 0)

    def timed():
        # CPU time of the whole process (MLX's CPU threads included) beside wall time: on a shared,
        # loaded machine it is far less disturbed by other processes than the wall clock. (On a GPU
        # the wall clock is the figure; CPU time there is only the host side.)
        c0 = time.process_time()
        out = workloads.run_inference(model, prompt, args.gen_tokens)
        out["cpu_seconds"] = time.process_time() - c0
        return out

    def stock():
        patch.remove(model)
        usage.unwatch(model)  # stock mlx_lm: no usage recorder either
        return timed()

    def candidate():
        setup_candidate(model)
        return timed()

    r = measure.interleaved({"stock": stock, "candidate": candidate}, pairs=args.pairs, warmup=args.warmup)
    patch.remove(model)
    usage.unwatch(model)
    secs = {a: [s["seconds"] for s in r["samples"] if s["arm"] == a] for a in ("stock", "candidate")}
    cpu = {(s["pair"], s["arm"]): s["cpu_seconds"] for s in r["samples"]}
    cpu_ratio = measure.median_ci([cpu[(i, "stock")] / cpu[(i, "candidate")] for i in range(args.pairs)])
    tok = args.prompt_tokens + args.gen_tokens
    say(f"### {label}")
    for arm in ("stock", "candidate"):
        med = statistics.median(secs[arm])
        say(f"  {arm:9s} median {med * 1e3:9.2f} ms per run ({tok / med:.0f} tok/s incl. prefill)")
    for clock, (ratio, lo, hi) in (("wall", (r["ratio"], r["lo"], r["hi"])), ("cpu ", cpu_ratio)):
        verdict = "meets" if ratio >= 0.99 else "BELOW"
        say(
            f"  {clock} time ratio stock/candidate = {ratio:.4f}  95% CI [{lo:.4f}, {hi:.4f}]  "
            f"({verdict} the >= 0.99 goal on the median)"
        )
    out = {k: r[k] for k in ("ratio", "lo", "hi", "n_pairs", "ratios", "samples")}
    out["cpu"] = dict(zip(("ratio", "lo", "hi"), cpu_ratio))
    return out


def generation_overhead(args, model) -> dict:
    say(
        f"## 2. generation overhead vs stock mlx_lm ({args.pairs} interleaved pairs, {args.warmup} warmups; "
        f"prompt {args.prompt_tokens}, generate {args.gen_tokens} tokens; ratio = stock time / candidate time)"
    )
    # (a) what the plugin does when native is in force: resolve it, leave the layers stock, and
    #     record usage (the forward hook of tilewise.usage, which the stock arm takes off).
    target = plugin.this_target(model)
    with tempfile.TemporaryDirectory(prefix="tw-bench-native-") as tmp:
        path = Path(tmp) / "native.json"
        path.write_text(json.dumps(P.make_policy(target=dict(target, device="*"), name="native")))
        record = plugin.apply_to(model, path)
    assert record.source == "file" and record.patched_layers == 0, record
    shapes = models.model_shapes(model)
    a = _compare(
        args,
        model,
        "(a) the plugin with the native policy in force (layers stock; usage recorded on every forward)",
        lambda m: usage.watch(m, target["model"], "bench", shapes),
    )
    # (b) the dispatch machinery itself: every linear patched, every plan native (the worst case any
    #     policy that touches all layers pays before its plans do anything).
    native = patch.prepare(P.native())
    b = _compare(
        args,
        model,
        "(b) the native policy forced through the patch on every linear (dispatch cost, worst case)",
        lambda m: patch.apply(m, native),
    )
    say(
        f"  noise floor: the interval of (a) spans [{a['cpu']['lo']:.4f}, {a['cpu']['hi']:.4f}] (CPU time), "
        f"[{a['lo']:.4f}, {a['hi']:.4f}] (wall): differences inside that are not resolved by this run"
    )
    return {"plugin_native": a, "forced_patch_native": b}


# ---------------------------------------------------------------------------------------------
# 4. the usage recorder's cost per forward call


def recorder_overhead(model, fp, forwards=2000, pairs=15) -> dict:
    """CPU time of building one decode forward's graph (no eval) with and without tilewise.usage's
    recording hook, alternated: the recorder's whole cost per token, which (2a) cannot resolve."""
    x = mx.zeros((1, 1), dtype=mx.int32)
    shapes = models.model_shapes(model)

    def run():
        t0 = time.process_time()
        for _ in range(forwards):
            model(x)
        return (time.process_time() - t0) / forwards

    stock, watched = [], []
    for _ in range(pairs):
        usage.unwatch(model)
        stock.append(run())
        usage.watch(model, fp, "bench", shapes)
        watched.append(run())
    usage.unwatch(model)
    diff = statistics.median(w - s for w, s in zip(watched, stock))
    say(
        f"## 4. usage recorder: one decode forward's graph, {forwards} per sample, {pairs} pairs, CPU time: "
        f"stock {us(statistics.median(stock)).strip()}, recorded {us(statistics.median(watched)).strip()}; "
        f"median difference {us(diff).strip()} per forward (per generated token)"
    )
    return {"stock_s": stock, "recorded_s": watched, "median_diff_s": diff}


# ---------------------------------------------------------------------------------------------
# 3. per-call dispatch overhead


def call_overhead(args, n=64, k=64, calls=20000, pairs=41) -> dict:
    """The Python cost of one patched-native call over a stock one: building the lazy graph of
    `calls` layer calls (no eval: the dispatch is all Python, and leaving MLX's compute threads out
    makes the samples far steadier on a shared machine)."""
    dtype = models.DTYPES[args.dtype] if args.dtype else mx.float32
    layer = nn.Linear(k, n, bias=False)
    layer.set_dtype(dtype)
    x = mx.random.normal((1, k)).astype(dtype)
    mx.eval(layer.parameters(), x)
    holder = nn.Sequential(layer)

    def run():
        t0 = time.process_time()
        for _ in range(calls):
            layer(x)
        return {"seconds": (time.process_time() - t0) / calls}

    def stock():
        patch.remove(holder)
        return run()

    def patched():
        patch.apply(holder, P.native())
        return run()

    r = measure.interleaved({"stock": stock, "candidate": patched}, pairs=pairs, warmup=2)
    patch.remove(holder)
    secs = {a: statistics.median(s["seconds"] for s in r["samples"] if s["arm"] == a) for a in ("stock", "candidate")}
    by = {(s["pair"], s["arm"]): s["seconds"] for s in r["samples"]}
    diffs = [by[(i, "candidate")] - by[(i, "stock")] for i in range(pairs)]
    say(
        f"## 3. dispatch cost: Linear({k}->{n}) at M=1, graph building only, {calls} calls per sample, {pairs} pairs, "
        f"CPU time: stock {us(secs['stock']).strip()}/call, patched-native {us(secs['candidate']).strip()}/call; "
        f"median per-pair difference {us(statistics.median(diffs)).strip()}/call"
    )
    return {
        "per_call_s": secs,
        "median_diff_s": statistics.median(diffs),
        "ratio": r["ratio"],
        "lo": r["lo"],
        "hi": r["hi"],
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="synthetic:tiny")
    ap.add_argument("--dtype", default=None, choices=sorted(models.DTYPES))
    ap.add_argument("--pairs", type=int, default=60)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--gen-tokens", type=int, default=16)
    ap.add_argument("--fetches", type=int, default=300)
    ap.add_argument("--daemon", default=None, help="tilewised binary (default: target/release, else target/debug)")
    ap.add_argument("--no-daemon", action="store_true", help="skip part 1 (no tilewised on this machine)")
    ap.add_argument("--out", default=None, help="also write this report here (and raw samples next to it as .json)")
    args = ap.parse_args()

    os.environ.setdefault("TILEWISE_MODELS_DIR", str(Path(tempfile.gettempdir()) / "tilewise-bench-models"))
    model, _, info = models.load_model(args.model, dtype=args.dtype)
    say(f"# plugin_bench — {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}")
    say(
        f"# machine: {platform.machine()} {workloads.device_name()}, {os.cpu_count()} cores, backend "
        f"{workloads.backend()}, mlx {mx.__version__}, python {platform.python_version()}"
    )
    say(
        f"# model: {args.model} ({info['dtype']}, {info['model_fingerprint']}); command: "
        f"python bench/plugin_bench.py {' '.join(sys.argv[1:])}"
    )
    t0 = time.perf_counter()
    fp = models.fingerprint(model)
    say(f"# model fingerprint (computed once per load by the plugin): {(time.perf_counter() - t0) * 1e3:.1f} ms")
    raw = {"args": vars(args), "model_fingerprint": fp}
    if not args.no_daemon:
        raw["fetch"] = fetch_latency(args, model)
    raw["generation"] = generation_overhead(args, model)
    raw["call"] = call_overhead(args)
    # (b) predicted from (3), robust to machine noise: matmul calls per run x dispatch cost per call.
    patch.apply(model, P.native())
    patch.reset_call_counts()
    workloads.run_inference(
        model, workloads.token_ids(workloads.vocab_size(model), args.prompt_tokens, 0), args.gen_tokens
    )
    calls = sum(patch.call_counts().values())
    patch.remove(model)
    per_call = raw["call"]["median_diff_s"]
    stock_run = statistics.median(
        s["cpu_seconds"] for s in raw["generation"]["forced_patch_native"]["samples"] if s["arm"] == "stock"
    )
    predicted = stock_run / (stock_run + calls * per_call)
    say(
        f"## (b) predicted from (3): {calls} patched matmul calls per run x {us(per_call).strip()} = "
        f"{calls * per_call * 1e3:.3f} ms on a {stock_run * 1e3:.1f} ms (CPU) run -> ratio {predicted:.4f}"
    )
    raw["predicted_forced_patch_ratio"] = predicted
    raw["usage_recorder"] = recorder_overhead(model, fp)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("\n".join(LINES) + "\n")
        out.with_suffix(".json").write_text(json.dumps(raw, indent=1, default=str))


if __name__ == "__main__":
    main()
