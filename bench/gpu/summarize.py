"""Markdown tables for results/h100/README.md from the committed raw outputs (no GPU needed).

Usage: python bench/gpu/summarize.py [results/h100] > /tmp/tables.md
"""

import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "evaluator"))
from tilewise.kernels import describe  # noqa: E402

ROOT = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).resolve().parents[2] / "results/h100")


def load(p):
    return json.loads((ROOT / p).read_text())


def gpu_time_table():
    gt = load("run3-gputime/gpu_time.json")
    kb = {(r["shape"], r["m"]): r for r in load("run2/kernel_bench.json")["shapes"]}
    print(
        "| shape (N×K) | M | native GPU µs | kernel GPU µs | GPU ratio | native roofline | kernel roofline | bound | rel err kernel / native | candidates correct | plan |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---|---|---|---|")
    for t in gt:
        r = kb[(t["shape"], t["m"])]
        n_ok = sum(c.get("correct", False) for c in r["candidates"])
        print(
            f"| {t['shape']} ({t['n']}×{t['k']}) | {t['m']} | {t['native_gpu_s'] * 1e6:.1f} | {t['kernel_gpu_s'] * 1e6:.1f} | "
            f"**{t['gpu_ratio']:.2f}** | {t['native_roofline']:.2f} | {t['kernel_roofline']:.2f} | {t['bound']} | "
            f"{r['best_rel_err']:.1e} / {r['native_rel_err']:.1e} | {n_ok}/{len(r['candidates'])} | {describe(t['plan'])} |"
        )


def wall_table(path, title):
    d = load(path)
    print(f"\n{title}\n")
    print("| shape | M | native µs | kernel µs (bare) | ratio [95 % CI] | best plan |")
    print("|---|---:|---:|---:|---|---|")
    for r in d["shapes"]:
        if "ratio" not in r:
            continue
        print(
            f"| {r['shape']} | {r['m']} | {r['native_s'] * 1e6:.1f} | {r['kernel_s'] * 1e6:.1f} ({r['raw_kernel_s'] * 1e6:.1f}) | "
            f"{r['ratio']:.3f} [{r['lo']:.3f}, {r['hi']:.3f}] | {r['best']} |"
        )
    for t in d.get("training_vjp", []):
        print(
            f"\ntraining fwd+bwd {t['shape']} M={t['m']}: ratio {t['ratio']:.3f} [{t['lo']:.3f}, {t['hi']:.3f}] ({describe(t['plan'])})",
            end="",
        )
    print()


def e2e_table():
    d = load("run5-e2e/e2e_bench.json")
    print(
        "| policy | kernel rules | gate | inference [95 % CI] | training [95 % CI] | combined [95 % CI] | prefill tok/s stock→policy | decode tok/s stock→policy | train step ms stock→policy |"
    )
    print("|---|---:|---|---|---|---|---|---|---|")
    for name, doc in d["policies"].items():
        r = d[name]
        inf, trn, comb = r["inference"], r["training"], r["combined"]
        steps = {
            arm: statistics.median(s["seconds"] for s in trn["samples"] if s["arm"] == arm) * 1e3
            for arm in ("stock", "candidate")
        }
        print(
            f"| {name} | {len(doc['matmul']['rules'])} | {'ok' if r['correct'] else 'FAIL'} (logits err {r['gate']['logits_rel_err']:.0e}) | "
            f"{inf['ratio']:.3f} [{inf['lo']:.3f}, {inf['hi']:.3f}] | {trn['ratio']:.3f} [{trn['lo']:.3f}, {trn['hi']:.3f}] | "
            f"**{comb['ratio']:.3f}** [{comb['lo']:.3f}, {comb['hi']:.3f}] | {inf['prefill_tok_s']['stock']:.0f}→{inf['prefill_tok_s']['candidate']:.0f} | "
            f"{inf['decode_tok_s']['stock']:.0f}→{inf['decode_tok_s']['candidate']:.0f} | {steps['stock']:.1f}→{steps['candidate']:.1f} |"
        )


if __name__ == "__main__":
    print("## GPU time\n")
    gpu_time_table()
    wall_table("run6-datachain/kernel_bench.json", "## Wall time, data-dependent chain (run6, partial)")
    wall_table("run4-chain/kernel_bench.json", "## Wall time, mx.depends chain (run4; concurrency-flattered)")
    print("\n## End to end\n")
    e2e_table()
