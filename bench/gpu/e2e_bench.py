"""End to end on one GPU: a tuned kernel policy vs stock MLX, through the evaluator.

The tuned policy takes, for every linear shape of Qwen2.5-0.5B and every M bucket the workloads hit,
the best kernel plan that bench/gpu/kernel_bench.py *proved* faster (its ratio's 95 % interval lies
above 1.0); everything else stays native. Then `tilewise.evaluate.evaluate` runs the correctness gate
and interleaved stock/candidate pairs for inference (mlx_lm generation: prefill tok/s, decode tok/s)
and a full training step, and reports the ratios with bootstrap intervals and the combined score
(0.7 x inference + 0.3 x training). The native policy is evaluated the same way as an A/A control.

Usage: python bench/gpu/e2e_bench.py --out DIR [--kernel-results kernel_bench.json] [--pairs 20]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "evaluator"))

# Which M values each benchmarked M stands for (rules are ranges; the workloads hit M = 1 for decode
# and the last prompt token, M = prompt - 1 for prefill, M = batch x seq for training).
M_BUCKETS = {1: (1, 1), 4: (2, 8), 16: (9, 16), 128: (17, 256), 512: (257, 1024), 2048: (1025, None)}


def tuned_rules(kernel_results: dict, min_lo: float = 1.0) -> list[dict]:
    """Rules from kernel_bench.py: plans whose wall-time ratio interval lies above `min_lo`."""
    rules = []
    for r in kernel_results["shapes"]:
        if r.get("best_plan") and r.get("lo", 0) > min_lo and r.get("all_correct"):
            lo, hi = M_BUCKETS[r["m"]]
            rules.append({"m": [lo, hi], "n": [r["n"], r["n"]], "k": [r["k"], r["k"]], "plan": r["best_plan"]})
    return rules


def gpu_rules(gpu_time: list, min_ratio: float = 1.05) -> list[dict]:
    """Rules from gpu_time.py: plans whose kernel GPU time (Nsight Compute) beat native's by min_ratio."""
    rules = []
    for t in gpu_time:
        if t.get("gpu_ratio") and t["gpu_ratio"] >= min_ratio:
            lo, hi = M_BUCKETS[t["m"]]
            rules.append({"m": [lo, hi], "n": [t["n"], t["n"]], "k": [t["k"], t["k"]], "plan": t["plan"]})
    return rules


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--kernel-results", type=Path, default=None)
    ap.add_argument("--pairs", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--model", default="synthetic:qwen2.5-0.5b")
    ap.add_argument(
        "--gpu-time",
        type=Path,
        default=Path(__file__).resolve().parents[2] / "results/h100/gpu_time.json",
        help="gpu_time.json: also evaluate a policy of the plans that won on GPU time",
    )
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    import mlx.core as mx

    from tilewise import evaluate as E
    from tilewise import models, policy
    from tilewise import workloads as W

    candidates = [args.kernel_results] if args.kernel_results else []
    candidates += [
        Path("/root/kb/kernel_bench.json"),
        Path(__file__).resolve().parents[2] / "results/h100/run8-kernels-full/kernel_bench.json",
    ]
    src = next((p for p in candidates if p and p.is_file()), None)
    if src is None:
        sys.exit("no kernel_bench.json found: run bench/gpu/kernel_bench.py first")
    kres = json.loads(src.read_text())

    t0 = time.perf_counter()
    model, _tok, info = models.load_model(args.model, dtype="bfloat16")
    print(f"loaded {args.model} ({info['model_fingerprint']}) in {time.perf_counter() - t0:.1f} s", flush=True)
    target = {"device": W.device_name(), "model": info["model_fingerprint"], "mlx": mx.__version__, "backend": "cuda"}
    docs = {"native": policy.make_policy([], name="native", target=target)}
    rules = tuned_rules(kres)
    docs["tuned"] = policy.make_policy(rules, name="tuned kernels (wall-time wins per shape)", target=target)
    print(f"tuned policy: {len(rules)} kernel rules from {src}", flush=True)
    if args.gpu_time and args.gpu_time.is_file():
        grules = gpu_rules(json.loads(args.gpu_time.read_text()))
        docs["tuned-gpu"] = policy.make_policy(grules, name="tuned kernels (GPU-time wins)", target=target)
        print(f"tuned-gpu policy: {len(grules)} kernel rules from {args.gpu_time}", flush=True)
    for name, doc in docs.items():
        for r in doc["matmul"]["rules"]:
            print(f"  {name}: m {r['m']} n {r['n'][0]} k {r['k'][0]}: {r['plan']}", flush=True)

    report = {
        "kernel_results": str(src),
        "model": info,
        "policies": docs,
        "defaults": {"inference": W.defaults("inference"), "training": W.defaults("training")},
    }
    for name, doc in docs.items():
        t0 = time.perf_counter()
        res = E.evaluate(model, doc, dtype="bfloat16", pairs=args.pairs, warmup=args.warmup, seed=0)
        res["wall_s"] = time.perf_counter() - t0
        report[name] = res
        (args.out / "e2e_bench.json").write_text(json.dumps(report, indent=1, default=str))
        print(summary(name, res), flush=True)
    print()
    print(
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}  {W.device_name()}  mlx {mx.__version__}  "
        f"{args.model} bf16  pairs {args.pairs}"
    )
    for name in docs:
        print(summary(name, report[name]))


def summary(name: str, res: dict) -> str:
    if not res.get("correct"):
        return f"{name:9s} INCORRECT: {res['gate'].get('reason')}"
    out = [f"{name:9s} gate ok (logits err {res['gate']['logits_rel_err']:.1e}), calls {res['calls']}"]
    for wl in ("inference", "training", "combined"):
        r = res.get(wl)
        if r:
            out.append(f"  {wl:9s} ratio {r['ratio']:.3f} [{r['lo']:.3f}, {r['hi']:.3f}]")
    inf = res.get("inference") or {}
    for key in ("prefill_tok_s", "decode_tok_s"):
        if key in inf:
            v = inf[key]
            out.append(f"  {key}: stock {v['stock']:.0f}, candidate {v['candidate']:.0f}")
    trn = res.get("training") or {}
    if trn.get("samples"):
        import statistics

        for arm in ("stock", "candidate"):
            ts = [s["seconds"] for s in trn["samples"] if s.get("arm") == arm]
            if ts:
                out.append(f"  training step {arm}: median {statistics.median(ts) * 1e3:.1f} ms")
    return "\n".join(out)


if __name__ == "__main__":
    main()
