"""Does `mx.depends` serialize a chunk the way real data dependencies do? A check of kernel_bench.py's
timing method on the one square shape of the model (q_proj/o_proj, 896 x 896), where a true chain
x_{i+1} = f(x_i, w_i) is possible: per-op wall time of native and of the best kernel plan, measured
(a) as independent ops, (b) chained with mx.depends (kernel_bench.py's method), (c) as a true data
chain. If (b) and (c) agree, the benchmark's ratios are what a model's sequence of linears sees.

Usage: python bench/gpu/chain_check.py [--kernel-results FILE] [--pairs 9]
"""

import argparse
import json
import math
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "evaluator"))
from tilewise.kernels import describe, kernel_matmul  # noqa: E402

N = K = 896
CHAIN = 128


def run(mode, fn, xs, ws):
    outs, prev = [], None
    for i in range(CHAIN):
        x = xs[i % len(xs)]
        if mode == "depends" and prev is not None:
            x = mx.depends([x], [prev])[0]
        elif mode == "data" and prev is not None:
            x = prev
        prev = fn(x, ws[i % len(ws)])
        outs.append(prev)
    t0 = time.perf_counter()
    mx.eval(outs)
    return (time.perf_counter() - t0) / CHAIN


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument(
        "--kernel-results",
        type=Path,
        default=Path(__file__).resolve().parents[2] / "results/h100/run8-kernels-full/kernel_bench.json",
    )
    ap.add_argument("--pairs", type=int, default=9)
    args = ap.parse_args()
    kres = json.loads(args.kernel_results.read_text())
    rows = []
    for r in kres["shapes"]:
        if (r["n"], r["k"]) != (N, K) or not r.get("best_plan"):
            continue
        m, plan = r["m"], r["best_plan"]
        ws = [(mx.random.normal((N, K)) / math.sqrt(K)).astype(mx.bfloat16) for _ in range(CHAIN)]
        xs = [mx.random.normal((m, K)).astype(mx.bfloat16) for _ in range(16)]
        mx.eval(ws, xs)
        native = lambda x, w: x @ w.T  # noqa: E731
        kernel = lambda x, w, p=plan: kernel_matmul(x, w, p)  # noqa: E731
        res = {"m": m, "plan": describe(plan)}
        for mode in ("independent", "depends", "data"):
            for f in (native, kernel, native, kernel):
                run(mode, f, xs, ws)  # warm
            tn, tk = [], []
            for i in range(args.pairs):
                order = ((native, tn), (kernel, tk)) if i % 2 == 0 else ((kernel, tk), (native, tn))
                for f, acc in order:
                    acc.append(run(mode, f, xs, ws))
            res[mode] = {
                "native_us": float(np.median(tn)) * 1e6,
                "kernel_us": float(np.median(tk)) * 1e6,
                "ratio": float(np.median([a / b for a, b in zip(tn, tk)])),
            }
        rows.append(res)
        print(json.dumps(res), flush=True)
    print(f"\nq_proj/o_proj 896x896, chain of {CHAIN}, per-op wall us (native / kernel = ratio)")
    print(f"{'M':>5s}  {'independent':>24s}  {'mx.depends chain':>24s}  {'true data chain':>24s}  plan")
    for r in rows:
        cells = [
            f"{r[m]['native_us']:6.1f} /{r[m]['kernel_us']:6.1f} = {r[m]['ratio']:5.2f}"
            for m in ("independent", "depends", "data")
        ]
        print(f"{r['m']:5d}  " + "  ".join(f"{c:>24s}" for c in cells) + f"  {r['plan']}")


if __name__ == "__main__":
    main()
