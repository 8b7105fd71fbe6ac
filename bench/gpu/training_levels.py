#!/usr/bin/env python3
"""Why does the training ratio of one policy come out ~1.20 in one measurement and ~1.33 in the next?

On the H100 the training step (4 x 512, Qwen2.5-0.5B shape, bf16) is host-bound (process CPU time ~
wall time) and the stock arm's time sits at one of two levels (~85 ms or ~117 ms) for runs of pairs,
while the fused candidate moves less (~72 / ~87 ms): the ratio follows the level. This script runs the
evaluator's own measurement (tilewise.evaluate: gate, inference pairs, then training pairs, in one
process, exactly as a worker does) several times per variant and records, for every training sample,
its wall and CPU time, the allocator's cache and active memory before it and the time since the
previous sample, so the level can be tied to the allocator, the clock or the process.

Variants (alternating, so drift falls on both):
  as-is   the worker's training step as it ships
  clear   mx.clear_cache() before each training sample (untimed): every sample allocates afresh
  warm    the sample's buffers are already in the cache (one untimed step of the same arm just before)
  adam    one AdamW per arm kept across steps (as a training loop keeps it) instead of a fresh one per step

After each evaluation the script collects garbage and reports the process's active memory and how
many fusion instances are still alive (an evaluation must leave nothing of its policy behind).

Usage: python3 bench/gpu/training_levels.py --model synthetic:qwen2.5-0.5b --rounds 2 --pairs 20 --out DIR
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "evaluator"))

import gc  # noqa: E402

import mlx.core as mx  # noqa: E402
import mlx.optimizers as optim  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402

from tilewise import evaluate, fusion, models, policy, workloads  # noqa: E402

SHIPPED_STEP = workloads.run_training_step


def host_probe_us():
    """A fixed piece of pure-Python work, timed: the host's speed right now (no MLX involved)."""
    tic = time.perf_counter()
    total = 0
    for i in range(20000):
        total += i * i
    return (time.perf_counter() - tic) * 1e6


def machine_counters():
    """cgroup CPU throttling and the kernel's steal time (hypervisor took the CPU), where readable."""
    out = {}
    try:
        for line in Path("/sys/fs/cgroup/cpu.stat").read_text().splitlines():
            k, v = line.split()
            out[k] = int(v)
    except OSError:
        pass
    try:
        cpu = Path("/proc/stat").read_text().splitlines()[0].split()
        out["steal_ticks"] = int(cpu[8])
    except (OSError, IndexError, ValueError):
        pass
    return out


def kept_optimizer_step(optimizers):
    """run_training_step with one AdamW per parameter layout (stock, fused) kept across steps."""

    def step(model, batch, learning_rate=1e-5):
        layout = tuple(k for k, _ in tree_flatten(model.parameters()))
        optimizer = optimizers.setdefault(layout, optim.AdamW(learning_rate=learning_rate))
        return SHIPPED_STEP(model, batch, optimizer=optimizer)

    return step


def instrumented(variant, log):
    """A run_training_step that records what surrounded each timed step (the timing is the shipped
    one, or the kept-optimizer one for `adam`)."""
    state = {"last_end": None}
    timed_step = kept_optimizer_step({}) if variant == "adam" else SHIPPED_STEP

    def step(model, batch, *a, **k):
        if variant == "clear":
            mx.clear_cache()
        elif variant == "warm":
            SHIPPED_STEP(model, batch, *a, **k)
        before = {
            "cache_mb": mx.get_cache_memory() / 2**20,
            "active_mb": mx.get_active_memory() / 2**20,
            "probe_us": host_probe_us(),
            "wall": time.time(),
        }
        start = time.perf_counter()
        gap = None if state["last_end"] is None else start - state["last_end"]
        out = timed_step(model, batch, *a, **k)
        state["last_end"] = time.perf_counter()
        log.append({**before, "gap_s": gap, "t": start, "seconds": out["seconds"], "cpu_s": out["cpu_s"]})
        return out

    return step


def summary(samples):
    by_pair = {}
    for s in samples:
        by_pair.setdefault(s["pair"], {})[s["arm"]] = s
    rows = []
    for p in sorted(by_pair):
        st, ca = by_pair[p]["stock"], by_pair[p]["candidate"]
        rows.append((p, st, ca, st["seconds"] / ca["seconds"]))
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="synthetic:qwen2.5-0.5b")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--pairs", type=int, default=20)
    ap.add_argument("--variants", default="as-is,clear,warm")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    model, _, info = models.load_model(args.model, dtype=args.dtype)
    traced = fusion.trace(model)
    groups = fusion.groups_of(model, traced)
    doc = policy.make_policy(fusion={"groups": [{"scope": g["scope"], "members": g["members"]} for g in groups]})
    print(f"# {args.model} {args.dtype} on {mx.default_device()}; fusion groups {[g['members'] for g in groups]}")
    limit = mx.set_cache_limit(0)
    mx.set_cache_limit(limit)
    print(f"# allocator cache limit {limit / 2**30:.1f} GiB", flush=True)

    results = []
    variants = args.variants.split(",")
    for r in range(args.rounds):
        for variant in variants if r % 2 == 0 else variants[::-1]:
            log = []
            workloads.run_training_step = instrumented(variant, log)
            counters = machine_counters()
            try:
                res = evaluate.evaluate(
                    model, doc, dtype=args.dtype, pairs=args.pairs, warmup=2, seed=100 + r, traced=traced
                )
            finally:
                workloads.run_training_step = SHIPPED_STEP
            after = machine_counters()
            delta = {k: after[k] - counters.get(k, 0) for k in after}
            trn, inf = res["training"], res["inference"]
            # evaluate's samples are in order; the log has warm-ups first, then one entry per sample.
            timed = log[-len(trn["samples"]) :]
            for s, extra in zip(trn["samples"], timed, strict=True):
                s.update({k: v for k, v in extra.items() if k not in s})
            rows = summary(trn["samples"])
            stock = [st["seconds"] * 1e3 for _, st, _, _ in rows]
            cand = [ca["seconds"] * 1e3 for _, _, ca, _ in rows]
            line = (
                f"round {r} {variant:6s} inference {inf['ratio']:.3f} [{inf['lo']:.3f}, {inf['hi']:.3f}]  "
                f"training {trn['ratio']:.3f} [{trn['lo']:.3f}, {trn['hi']:.3f}]  stock ms median {statistics.median(stock):.1f} "
                f"(min {min(stock):.1f} max {max(stock):.1f})  cand ms median {statistics.median(cand):.1f} "
                f"(min {min(cand):.1f} max {max(cand):.1f})"
            )
            print(line, flush=True)
            del res
            gc.collect()
            alive = sum(1 for o in gc.get_objects() if isinstance(o, fusion.Instance))
            print(f"    machine during it: {delta}")
            print(
                f"    after it (garbage collected): active {mx.get_active_memory() / 2**20:.0f} MiB, fusion instances alive {alive}"
            )
            for p, st, ca, ratio in rows:
                print(
                    f"    {p:3d} stock {st['seconds'] * 1e3:7.2f} cpu {st['cpu_s'] * 1e3:7.2f} cache {st['cache_mb']:7.0f} "
                    f"act {st['active_mb']:6.0f} probe {st['probe_us']:5.0f} | cand {ca['seconds'] * 1e3:7.2f} cpu {ca['cpu_s'] * 1e3:7.2f} "
                    f"cache {ca['cache_mb']:7.0f} probe {ca['probe_us']:5.0f} | {ratio:.3f}"
                )
            results.append(
                {
                    "round": r,
                    "variant": variant,
                    "inference": {k: inf[k] for k in ("ratio", "lo", "hi")},
                    "training": {k: trn[k] for k in ("ratio", "lo", "hi")},
                    "machine": delta,
                    "samples": trn["samples"],
                }
            )
    (args.out / "training_levels.json").write_text(
        json.dumps({"info": {"model": args.model, "dtype": args.dtype}, "runs": results}, indent=1, default=str)
    )
    print("# per variant: training ratios of each round")
    for variant in variants:
        print(
            f"  {variant:6s} " + "  ".join(f"{x['training']['ratio']:.3f}" for x in results if x["variant"] == variant)
        )


if __name__ == "__main__":
    main()
