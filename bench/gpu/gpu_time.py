"""GPU time of native vs the best kernel plan per shape, measured by Nsight Compute (ncu).

kernel_bench.py times wall-clock per matmul in a chunk of independent ops, which includes MLX's host
cost per op (graph encoding; for cuBLAS calls, stream capture into the CUDA graph). That is what a
host-bound workload (decode) feels, but it hides the kernels' own GPU time, which is what a GPU-bound
workload (prefill, training) feels. This script gets the GPU time: it runs, per shape, one native op
and one kernel-plan op on fresh operands, separated by uniquely named marker kernels, under
`ncu --metrics gpu__time_duration.sum` (caches flushed before every kernel, so weights come from HBM
as they do in a model; clocks left as the card runs them). Every kernel between two markers is summed
(cuBLAS may launch more than one; a split-K plan launches its reduction).

  python bench/gpu/gpu_time.py --emit --kernel-results FILE      # the program ncu profiles
  ncu --csv ... python bench/gpu/gpu_time.py --emit ... > raw.csv
  python bench/gpu/gpu_time.py --parse raw.csv --kernel-results FILE --out DIR
bench/gpu/run-h100.sh gputime does all three.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "evaluator"))


def load_results(path):
    return json.loads(Path(path).read_text())


def emit(kres):
    import mlx.core as mx

    from tilewise.kernels import describe, kernel_matmul

    markers = {}

    def mark(tag):
        if tag not in markers:
            markers[tag] = mx.fast.cuda_kernel(
                name=f"twmark_{tag}", input_names=["a"], output_names=["b"], source="if (threadIdx.x == 0) b[0] = a[0];"
            )
        mx.eval(
            markers[tag](
                inputs=[mx.zeros((1,))],
                grid=(32, 1, 1),
                threadgroup=(32, 1, 1),
                output_shapes=[(1,)],
                output_dtypes=[mx.float32],
            )[0]
        )
        mx.synchronize()

    for i, r in enumerate(kres["shapes"]):
        if not r.get("best_plan"):
            continue
        m, n, k, plan = r["m"], r["n"], r["k"], r["best_plan"]
        x = mx.random.normal((m, k)).astype(mx.bfloat16)
        w = (mx.random.normal((n, k)) / math.sqrt(k)).astype(mx.bfloat16)
        mx.eval(x, w)
        # warm both (kernel compile, cuBLAS handles) outside the measured window
        mx.eval(x @ w.T, kernel_matmul(x, w, plan))
        mx.synchronize()
        mark(f"{i}_native")
        mx.eval(x @ w.T)
        mx.synchronize()
        mark(f"{i}_kernel")
        mx.eval(kernel_matmul(x, w, plan))
        mx.synchronize()
        mark(f"{i}_end")
        print(f"emitted {i} {r['shape']} M={m} {describe(plan)}", file=sys.stderr, flush=True)


def parse(raw_csv_text, kres, bw, peak):
    """Sum gpu__time_duration between markers: {index: {"native": s, "kernel": s, "native_kernels": [...]}}."""
    lines = raw_csv_text.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith('"ID"'))
    rows = list(csv.DictReader(io.StringIO("\n".join(lines[start:]))))
    out, cur = {}, None
    for row in rows:
        if row.get("Metric Name") != "gpu__time_duration.sum":
            continue
        name = row["Kernel Name"]
        value = float(row["Metric Value"].replace(",", ""))
        unit = row.get("Metric Unit", "ns")
        seconds = value * {"ns": 1e-9, "nsecond": 1e-9, "us": 1e-6, "usecond": 1e-6, "ms": 1e-3, "msecond": 1e-3}.get(
            unit, 1e-9
        )
        if name.startswith("custom_kernel_twmark_") or "twmark_" in name:
            tag = name.split("twmark_", 1)[1].split("(")[0]
            idx, arm = tag.rsplit("_", 1)
            cur = None if arm == "end" else (int(idx), arm)
            continue
        if cur is None:
            continue
        rec = out.setdefault(cur[0], {"native": 0.0, "kernel": 0.0, "native_kernels": [], "kernel_kernels": []})
        rec[cur[1]] += seconds
        rec[f"{cur[1]}_kernels"].append(name[:80])
    table = []
    for i, rec in sorted(out.items()):
        r = kres["shapes"][i]
        m, n, k = r["m"], r["n"], r["k"]
        bytes_min = (m * k + n * k + m * n) * 2
        floor = max(bytes_min / bw, 2 * m * n * k / peak)
        table.append(
            {
                "shape": r["shape"],
                "m": m,
                "n": n,
                "k": k,
                "plan": r["best_plan"],
                "native_gpu_s": rec["native"],
                "kernel_gpu_s": rec["kernel"],
                "gpu_ratio": rec["native"] / rec["kernel"] if rec["kernel"] else None,
                "native_roofline": floor / rec["native"] if rec["native"] else None,
                "kernel_roofline": floor / rec["kernel"] if rec["kernel"] else None,
                "bound": "mem" if bytes_min / bw >= 2 * m * n * k / peak else "flop",
                "native_kernels": rec["native_kernels"],
                "kernel_kernels": rec["kernel_kernels"],
                "wall_ratio": r.get("ratio"),
                "wall_lo": r.get("lo"),
                "wall_hi": r.get("hi"),
            }
        )
    return table


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--emit", action="store_true")
    ap.add_argument("--parse", type=Path)
    ap.add_argument("--kernel-results", type=Path, required=True)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    kres = load_results(args.kernel_results)
    if args.emit:
        emit(kres)
        return
    c = kres["ceilings"]
    table = parse(args.parse.read_text(errors="replace"), kres, c["copy_bytes_per_s"], c["bf16_flop_per_s"])
    if args.out:
        (args.out / "gpu_time.json").write_text(json.dumps(table, indent=1))
    from tilewise.kernels import describe

    print(
        f"GPU time per op (ncu gpu__time_duration, caches flushed); roofline vs copy "
        f"{c['copy_bytes_per_s'] / 1e12:.2f} TB/s and {c['bf16_flop_per_s'] / 1e12:.0f} TFLOP/s"
    )
    print(
        f"{'shape':14s} {'M':>5s} {'native us':>9s} {'kernel us':>9s} {'gpu ratio':>9s} {'nat roof':>8s} "
        f"{'ker roof':>8s} {'bound':>5s} {'wall ratio':>10s}  plan / native kernels"
    )
    for t in table:
        print(
            f"{t['shape']:14s} {t['m']:5d} {t['native_gpu_s'] * 1e6:9.2f} {t['kernel_gpu_s'] * 1e6:9.2f} "
            f"{(t['gpu_ratio'] or float('nan')):9.3f} {(t['native_roofline'] or 0):8.2f} {(t['kernel_roofline'] or 0):8.2f} "
            f"{t['bound']:>5s} {(t['wall_ratio'] or float('nan')):10.3f}  {describe(t['plan'])} / "
            f"{','.join(s.split('(')[0][:40] for s in t['native_kernels'])}"
        )


if __name__ == "__main__":
    main()
