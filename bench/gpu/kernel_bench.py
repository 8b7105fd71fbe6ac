"""Kernel plans vs MLX's native matmul on one GPU, for every linear shape of Qwen2.5-0.5B.

For each (N, K) of the model and each M (tokens in flight) it
  1. measures the card's two ceilings in the same run: device copy bandwidth and a large native bf16
     matmul's rate (the roofline every row is compared to);
  2. checks every candidate tile set for correctness on fresh random inputs (output pre-filled with NaN,
     ||out - ref|| / ||ref|| vs a float32 reference; native's own error is printed beside it);
  3. screens the correct candidates (median of a few timed chunks), then times the best three against
     native in interleaved pairs (native, kernel, kernel, native, ...): the score is the median of the
     per-pair ratios native/kernel with a bootstrap 95 % interval;
  4. times one training-shaped forward+backward (kernel forward, native-matmul VJP) against native.

Timing discipline: each timed "chunk" evaluates a chain of matmuls, each fed by the previous output
through two tiny elementwise ops (as a model's linears are fed; independent ops, or ops chained only by
mx.depends, run concurrently inside MLX's CUDA graphs and flatter small kernels), whose weights rotate through enough copies to exceed the L2 cache (like a model's 24
layers do), so no kernel is timed on a cache-resident weight. Times are wall-clock around `mx.eval` of
the chunk, divided by its length: they include MLX's host cost per op, which is what decode feels.
The graph is built before the clock starts; Python's per-call build cost is reported separately.
bench/gpu/gpu_time.py gives the kernels' own GPU time (Nsight Compute) for the best plans.

Usage: python bench/gpu/kernel_bench.py --out DIR [--quick]
Writes DIR/kernel_bench.json (every raw sample) and prints a table last.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import mlx.core as mx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "evaluator"))
from tilewise.kernels import (  # noqa: E402
    describe,
    kernel_matmul,
    kernel_matmul_checked,
    machine_backend,
    plan_problems,
    raw_kernel_fn,
)

# Qwen2.5-0.5B: hidden 896, intermediate 4864, 14 heads / 2 KV heads of 64, vocab 151936 (tied head).
SHAPES = [
    ("q_proj/o_proj", 896, 896),
    ("k_proj/v_proj", 128, 896),
    ("gate/up", 4864, 896),
    ("down", 896, 4864),
    ("head", 151936, 896),
]
MS = [1, 4, 16, 128, 512, 2048]
L2_BYTES = 50 * 2**20
DTYPE = mx.bfloat16
TOL = 1e-2  # bf16 correctness tolerance (the evaluator's gate uses the same order)


def gemv(r, s, v=8):
    return {"kind": "kernel", "backend": "cuda", "family": "gemv", "rows_per_block": r, "split_k": s, "vector_width": v}


def gemm(bm, bn, bk, w, s=1, v=8):
    return {
        "kind": "kernel",
        "backend": "cuda",
        "family": "gemm",
        "block_m": bm,
        "block_n": bn,
        "block_k": bk,
        "warps": w,
        "vector_width": v,
        "split_k": s,
    }


def candidates(m, quick=False):
    """The tile sets tried per shape: a curated slice of kernel_space (the full space is ~600 plans per
    shape; the daemon's evolution is what walks all of it)."""
    if m <= 16:
        out = [gemv(r, s) for r in (1, 2, 4, 8, 16) for s in (1, 2, 4) if not (quick and s == 4)]
        out += [gemv(4, 1, 4), gemm(16, 64, 64, 4), gemm(16, 128, 32, 4)]
    else:
        tiles = [
            (32, 64, 32, 2),
            (64, 64, 32, 4),
            (64, 64, 64, 4),
            (64, 128, 32, 4),
            (128, 64, 32, 4),
            (128, 128, 32, 8),
            (64, 256, 32, 8),
            (32, 128, 64, 4),
            (128, 32, 32, 4),
            (64, 64, 32, 2),
            (16, 64, 64, 4),
            (32, 32, 64, 2),
            (16, 128, 64, 4),
        ]
        out = [gemm(*t) for t in tiles]
        out += [
            gemm(64, 64, 32, 4, 2),
            gemm(64, 128, 32, 4, 2),
            gemm(128, 128, 32, 8, 2),
            gemm(64, 64, 64, 4, 4),
            gemm(32, 64, 64, 4, 2),
            gemm(16, 64, 64, 4, 4),
        ]
    return [p for p in out if not plan_problems(p, "cuda", "bfloat16", m)]


def bootstrap_median(ratios, n_boot=4000, seed=0):
    r = np.asarray(ratios, dtype=np.float64)
    rng = np.random.default_rng(seed)
    meds = np.median(rng.choice(r, size=(n_boot, len(r)), replace=True), axis=1)
    return float(np.median(r)), float(np.percentile(meds, 2.5)), float(np.percentile(meds, 97.5))


def rand(shape, scale=1.0, seed=None):
    key = mx.random.key(seed) if seed is not None else None
    return (mx.random.normal(shape, key=key) * scale).astype(DTYPE)


class Problem:
    """Rotating operands for one (M, N, K): `chunk` matmuls per timed sample, weights spread over enough
    copies to exceed L2, outputs capped at a few GB."""

    def __init__(self, m, n, k, mode="data"):
        self.m, self.n, self.k, self.mode = m, n, k, mode
        w_bytes = n * k * 2
        out_bytes = m * n * 2
        self.chunk = int(min(256, max(8, math.ceil(4 * L2_BYTES / w_bytes)), max(4, 4e9 // out_bytes)))
        n_w = min(self.chunk, max(1, math.ceil(4 * L2_BYTES / w_bytes)))
        n_x = min(self.chunk, 16)
        self.ws = [rand((n, k), 1 / math.sqrt(k)) for _ in range(n_w)]
        self.xs = [rand((m, k)) for _ in range(n_x)]
        mx.eval(self.ws, self.xs)

    def ops(self, fn):
        """The chunk's matmuls, each fed by the one before: x_i = x + 0 * y_{i-1}[..., :1] (two tiny
        elementwise ops, the same in both arms). A model runs its linears one after another; independent
        ops run concurrently inside MLX's CUDA graphs and flatter small kernels that leave most of the
        GPU idle, and so does an `mx.depends` chain (bench/gpu/chain_check.py showed both; run1, run2 and
        run4 were timed that way). `mode="independent"` keeps the old method for comparison."""
        outs, prev = [], None
        for i in range(self.chunk):
            x = self.xs[i % len(self.xs)]
            if prev is not None and self.mode == "data":
                x = x + prev[..., :1] * 0
            prev = fn(x, self.ws[i % len(self.ws)])
            outs.append(prev)
        return outs

    def time(self, fn):
        """Seconds per matmul for one chunk (device + launch; graph built before the clock)."""
        outs = self.ops(fn)
        t0 = time.perf_counter()
        mx.eval(outs)
        return (time.perf_counter() - t0) / self.chunk

    def build_cost(self, fn, reps=3):
        """Python seconds to build one call's graph node (no evaluation)."""
        best = float("inf")
        for _ in range(reps):
            t0 = time.perf_counter()
            outs = self.ops(fn)
            best = min(best, (time.perf_counter() - t0) / self.chunk)
            del outs
        return best


def native(x, w):
    return x @ w.T


def with_plan(plan):
    return lambda x, w: kernel_matmul(x, w, plan)


def rel_err(out, ref):
    out32, ref32 = out.astype(mx.float32), ref
    return (mx.linalg.norm((out32 - ref32).flatten()) / mx.linalg.norm(ref32.flatten())).item()


def check(plan, m, n, k, seed):
    """Fresh random operands, NaN-poisoned output: (kernel rel err, native rel err) vs float32."""
    x = rand((m, k), seed=seed)
    w = rand((n, k), 1 / math.sqrt(k), seed=seed + 1)
    ref = x.astype(mx.float32) @ w.astype(mx.float32).T
    out = kernel_matmul_checked(x, w, plan)
    nat = x @ w.T
    e_k, e_n = rel_err(out, ref), rel_err(nat, ref)
    return (e_k if math.isfinite(e_k) else float("nan")), e_n


TORCH_CEILINGS = r"""
import json, torch
a = torch.empty(2**29, dtype=torch.bfloat16, device="cuda").normal_()  # 1 GiB
b = torch.empty_like(a)
def t(f, n):
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(3): f()
    torch.cuda.synchronize(); s.record()
    for _ in range(n): f()
    e.record(); torch.cuda.synchronize()
    return s.elapsed_time(e) / 1e3 / n
bw = 2 * a.numel() * 2 / t(lambda: b.copy_(a), 20)
x = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
w = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
fl = 2 * 8192**3 / t(lambda: x @ w.T, 20)
print(json.dumps({"copy_bytes_per_s": bw, "bf16_flop_per_s": fl}))
"""


def torch_ceilings():
    """The same two ceilings through PyTorch (CUDA events, cuBLAS), in a separate process so the two
    frameworks never share the card's memory pool; None when PyTorch is not there."""
    try:
        out = subprocess.run([sys.executable, "-c", TORCH_CEILINGS], capture_output=True, text=True, timeout=120)
        return json.loads(out.stdout.strip().splitlines()[-1])
    except Exception:
        return None


def ceilings():
    """Copy bandwidth (bytes read + written per second) and a large native bf16 matmul's FLOP/s."""
    a = mx.random.normal((2**28,)).astype(DTYPE)  # 512 MiB
    mx.eval(a)
    ts = []
    for _ in range(12):
        t0 = time.perf_counter()
        mx.eval(a + 1)  # an elementwise pass: one read and one write of every element
        ts.append(time.perf_counter() - t0)
    bw = 2 * a.nbytes / float(np.median(ts[2:]))
    del a
    x, w = rand((8192, 8192)), rand((8192, 8192), 1 / 90.0)
    mx.eval(x, w)
    ts = []
    for _ in range(8):
        t0 = time.perf_counter()
        mx.eval(x @ w.T)
        ts.append(time.perf_counter() - t0)
    flops = 2 * 8192**3 / float(np.median(ts[2:]))
    return bw, flops


def roofline(m, n, k, seconds, bw, peak):
    """Fraction of the roofline floor reached, and which bound the floor is."""
    bytes_min = (m * k + n * k + m * n) * 2
    t_mem, t_flop = bytes_min / bw, 2 * m * n * k / peak
    floor = max(t_mem, t_flop)
    return floor / seconds, ("mem" if t_mem >= t_flop else "flop")


def interleaved(problem, fn_a, fn_b, pairs):
    """Pairs of (a, b) chunk times, the order alternating each pair; returns lists of seconds."""
    ta, tb = [], []
    for i in range(pairs):
        if i % 2 == 0:
            ta.append(problem.time(fn_a))
            tb.append(problem.time(fn_b))
        else:
            tb.append(problem.time(fn_b))
            ta.append(problem.time(fn_a))
    return ta, tb


def bench_shape(name, n, k, m, bw, peak, args, log):
    prob = Problem(m, n, k, args.chain)
    cands = candidates(m, args.quick)
    # warm native (cuBLAS handles, allocator) and screen it like the candidates
    for _ in range(2):
        prob.time(native)
    t_native_screen = float(np.median([prob.time(native) for _ in range(args.screen)]))
    rows = []
    for i, plan in enumerate(cands):
        rec = {"plan": plan, "label": describe(plan)}
        try:
            e_k, e_n = check(plan, m, n, k, seed=1000 + i)
            rec.update(rel_err=e_k, native_rel_err=e_n, correct=bool(e_k < TOL))
            if rec["correct"]:
                fn = with_plan(plan)
                prob.time(fn)  # compile + warm
                rec["screen_s"] = [prob.time(fn) for _ in range(args.screen)]
                rec["screen_median_s"] = float(np.median(rec["screen_s"]))
        except Exception as e:  # a candidate that fails to compile or run is recorded, never fatal
            rec.update(correct=False, error=f"{type(e).__name__}: {e}"[:500])
        rows.append(rec)
    timed = sorted((r for r in rows if r.get("screen_median_s")), key=lambda r: r["screen_median_s"])
    finals = []
    for rec in timed[: args.finalists]:
        fn = with_plan(rec["plan"])
        t_nat, t_ker = interleaved(prob, native, fn, args.pairs)
        ratios = [a / b for a, b in zip(t_nat, t_ker)]
        med, lo, hi = bootstrap_median(ratios)
        rec.update(
            pairs_native_s=t_nat,
            pairs_kernel_s=t_ker,
            ratio=med,
            lo=lo,
            hi=hi,
            native_median_s=float(np.median(t_nat)),
            kernel_median_s=float(np.median(t_ker)),
        )
        finals.append(rec)
    best = max(finals, key=lambda r: r["ratio"]) if finals else None
    if best:
        # What the custom_function wrapper (the VJP) costs per call: wrapped vs bare kernel, interleaved.
        raw = raw_kernel_fn(best["plan"], prob.xs[0], prob.ws[0])
        t_wrap, t_raw = interleaved(prob, with_plan(best["plan"]), raw, 7)
        best.update(
            raw_kernel_s=t_raw,
            wrapped_kernel_s=t_wrap,
            raw_median_s=float(np.median(t_raw)),
            wrapper_ratio=float(np.median([a / b for a, b in zip(t_wrap, t_raw)])),
        )
    out = {
        "shape": name,
        "m": m,
        "n": n,
        "k": k,
        "chunk": prob.chunk,
        "weight_copies": len(prob.ws),
        "native_screen_s": t_native_screen,
        "candidates": rows,
        "best": best and best["label"],
    }
    t_nat = best["native_median_s"] if best else t_native_screen
    out["native_s"] = t_nat
    out["native_roofline"], out["bound"] = roofline(m, n, k, t_nat, bw, peak)
    out["build_native_s"] = prob.build_cost(native)
    if best:
        out["build_kernel_s"] = prob.build_cost(with_plan(best["plan"]))
        out["kernel_s"] = best["kernel_median_s"]
        out["kernel_roofline"], _ = roofline(m, n, k, best["kernel_median_s"], bw, peak)
        out["raw_kernel_s"] = best["raw_median_s"]
        out.update(
            ratio=best["ratio"],
            lo=best["lo"],
            hi=best["hi"],
            best_plan=best["plan"],
            best_rel_err=best["rel_err"],
            native_rel_err=best["native_rel_err"],
        )
    n_ok = sum(r.get("correct", False) for r in rows)
    out["all_correct"] = n_ok == len(rows)
    log(
        f"{name:14s} M={m:5d} native {t_nat * 1e6:9.1f} us  best {out.get('best')}  "
        f"ratio {out.get('ratio', float('nan')):.3f} [{out.get('lo', float('nan')):.3f}, {out.get('hi', float('nan')):.3f}]  "
        f"correct {n_ok}/{len(rows)}"
    )
    del prob
    return out


def training_vjp(results, pairs, log):
    """Forward + backward of one linear at a training shape: kernel forward (+ native VJP) vs native."""
    out = []
    for name, n, k in SHAPES:
        m = 4096  # batch 8 x 512 tokens, the evaluator's default training batch on CUDA
        best = next((r for r in results if r["n"] == n and r["k"] == k and r["m"] == 2048 and r.get("best_plan")), None)
        if best is None:
            continue
        plan = best["best_plan"]
        x, w = rand((m, k)), rand((n, k), 1 / math.sqrt(k))
        g = rand((m, n))
        mx.eval(x, w, g)

        def step(fn, x=x, w=w, g=g):
            loss_grad = mx.value_and_grad(lambda x, w: (fn(x, w) * g).sum(), argnums=(0, 1))
            return lambda: mx.eval(loss_grad(x, w))

        nat, ker = step(native), step(with_plan(plan))
        for f in (nat, ker, nat, ker):
            f()
        tn, tk = [], []
        for i in range(pairs):
            for f, acc in ((nat, tn), (ker, tk)) if i % 2 == 0 else ((ker, tk), (nat, tn)):
                t0 = time.perf_counter()
                f()
                acc.append(time.perf_counter() - t0)
        med, lo, hi = bootstrap_median([a / b for a, b in zip(tn, tk)])
        rec = {
            "shape": name,
            "m": m,
            "n": n,
            "k": k,
            "plan": plan,
            "native_s": tn,
            "kernel_s": tk,
            "ratio": med,
            "lo": lo,
            "hi": hi,
        }
        log(
            f"train fwd+bwd {name:8s} M={m} plan {describe(plan)} native {np.median(tn) * 1e6:.0f} us "
            f"kernel {np.median(tk) * 1e6:.0f} us ratio {med:.3f} [{lo:.3f}, {hi:.3f}]"
        )
        out.append(rec)
    return out


def nvidia_smi():
    try:
        q = "name,driver_version,memory.total,clocks.sm,clocks.max.sm,power.limit,temperature.gpu"
        return subprocess.run(
            ["nvidia-smi", f"--query-gpu={q}", "--format=csv,noheader"], capture_output=True, text=True, timeout=20
        ).stdout.strip()
    except Exception as e:  # not fatal: the card is also named by MLX
        return f"nvidia-smi unavailable: {e}"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--quick", action="store_true", help="fewer candidates and pairs (smoke run)")
    ap.add_argument("--pairs", type=int, default=15)
    ap.add_argument("--screen", type=int, default=3)
    ap.add_argument("--finalists", type=int, default=3)
    ap.add_argument("--shapes", default="", help="comma-separated subset of shape names")
    ap.add_argument("--ms", default=",".join(map(str, MS)))
    ap.add_argument(
        "--chain",
        choices=["data", "independent"],
        default="data",
        help="data: each matmul's input depends on the previous output (default)",
    )
    ap.add_argument(
        "--budget-s",
        type=float,
        default=1e9,
        help="start no new shape after this many seconds (results so far are kept)",
    )
    args = ap.parse_args()
    if args.quick:
        args.pairs, args.finalists = min(args.pairs, 7), min(args.finalists, 2)
    args.out.mkdir(parents=True, exist_ok=True)
    log_f = open(args.out / "kernel_bench.log", "a")

    def log(msg):
        print(msg, flush=True)
        log_f.write(msg + "\n")
        log_f.flush()

    if machine_backend() != "cuda":
        sys.exit(f"kernel_bench needs MLX's CUDA backend; this process runs {machine_backend()}")
    env = {
        "date_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "nvidia_smi": nvidia_smi(),
        "mlx": mx.__version__,
        "python": platform.python_version(),
        "device": str(mx.device_info() if hasattr(mx, "device_info") else mx.default_device()),
    }
    log(json.dumps(env))
    tc = torch_ceilings()
    bw_mlx, peak_mlx = ceilings()
    log(
        f"ceilings, MLX: copy {bw_mlx / 1e12:.2f} TB/s (read+write, elementwise pass), bf16 8192^3 matmul "
        f"{peak_mlx / 1e12:.0f} TFLOP/s; PyTorch: "
        + (
            f"copy {tc['copy_bytes_per_s'] / 1e12:.2f} TB/s, matmul {tc['bf16_flop_per_s'] / 1e12:.0f} TFLOP/s"
            if tc
            else "unavailable"
        )
    )
    # The roofline uses the best of each: the card's ceiling, not one framework's.
    bw = max(bw_mlx, tc["copy_bytes_per_s"] if tc else 0)
    peak = max(peak_mlx, tc["bf16_flop_per_s"] if tc else 0)
    results = []
    names = set(filter(None, args.shapes.split(",")))
    ms = [int(v) for v in args.ms.split(",")]
    t_start = time.perf_counter()
    doc = {
        "env": env,
        "ceilings": {"copy_bytes_per_s": bw, "bf16_flop_per_s": peak, "mlx": [bw_mlx, peak_mlx], "torch": tc},
        "shapes": results,
        "training_vjp": [],
        "args": {k: str(v) for k, v in vars(args).items()},
        "skipped": [],
    }

    def save():
        doc["wall_s"] = time.perf_counter() - t_start
        (args.out / "kernel_bench.json").write_text(json.dumps(doc, indent=1))

    for name, n, k in SHAPES:
        if names and name not in names:
            continue
        for m in ms:
            if time.perf_counter() - t_start > args.budget_s:
                doc["skipped"].append({"shape": name, "m": m, "why": "time budget"})
                log(f"{name} M={m}: skipped (time budget)")
                continue
            results.append(bench_shape(name, n, k, m, bw, peak, args, log))
            save()
    train = training_vjp(results, args.pairs, log)
    doc["training_vjp"] = train
    save()
    # The table, last (the device tool returns the tail of the output).
    log("")
    log(f"{env['date_utc']}  {env['nvidia_smi']}  mlx {env['mlx']}")
    log(f"ceilings: copy {bw / 1e12:.2f} TB/s, bf16 matmul {peak / 1e12:.0f} TFLOP/s")
    log(
        f"{'shape':14s} {'M':>5s} {'native us':>10s} {'kernel us':>10s} {'bare us':>8s} {'ratio':>6s} {'95% CI':>15s} "
        f"{'nat roof':>8s} {'ker roof':>8s} {'bound':>5s} {'err':>8s} {'nat err':>8s} ok  best plan"
    )
    for r in results:
        if "ratio" not in r:
            log(f"{r['shape']:14s} {r['m']:5d} {r['native_s'] * 1e6:10.1f}  (no correct candidate)")
            continue
        log(
            f"{r['shape']:14s} {r['m']:5d} {r['native_s'] * 1e6:10.1f} {r['kernel_s'] * 1e6:10.1f} "
            f"{r['raw_kernel_s'] * 1e6:8.1f} {r['ratio']:6.3f} "
            f"[{r['lo']:.3f},{r['hi']:.3f}] {r['native_roofline']:8.2f} {r['kernel_roofline']:8.2f} {r['bound']:>5s} "
            f"{r['best_rel_err']:8.1e} {r['native_rel_err']:8.1e} {'y' if r['all_correct'] else 'N'}   {r['best']}"
        )
    for t in train:
        log(
            f"train fwd+bwd {t['shape']} M={t['m']}: ratio {t['ratio']:.3f} [{t['lo']:.3f},{t['hi']:.3f}] "
            f"({describe(t['plan'])}, backward = native matmuls)"
        )


if __name__ == "__main__":
    main()
