#!/usr/bin/env python3
"""Does an evaluation leave its fusion's weights behind? On the H100 each evaluation of a fused policy
raised the worker's active memory by the fused weights' size (446 MiB on Qwen2.5-0.5B bf16) although
no fusion object was alive any more (bench/gpu/training_levels.py); on CPU it does not. A worker keeps
one process for a whole session, so that would grow with every fused candidate.

This runs each stage of an evaluation on its own, twice, and prints the active memory after it once
garbage is collected, so the stage that keeps memory shows up:

  prepare    fusion.prepare (concatenated weights built), then dropped
  forward    prepare, switched on, one forward pass, switched off, dropped
  train      prepare, on, one training step (tilewise.workloads), off, dropped
  gate       prepare, the correctness gate (tilewise.gate.check), dropped
  inference  tilewise.evaluate with the inference workload only
  training   tilewise.evaluate with the training workload only

Usage: python3 bench/gpu/fusion_memory.py [--model synthetic:qwen2.5-0.5b] [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import gc
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "evaluator"))

import mlx.core as mx  # noqa: E402

from tilewise import evaluate, fusion, gate, models, policy, workloads  # noqa: E402


def active_mib():
    gc.collect()
    mx.synchronize()
    return mx.get_active_memory() / 2**20


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="synthetic:qwen2.5-0.5b")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()

    model, _, _ = models.load_model(args.model, dtype=args.dtype)
    traced = fusion.trace(model)
    groups = fusion.groups_of(model, traced)
    doc = policy.make_policy(fusion={"groups": [{"scope": g["scope"], "members": g["members"]} for g in groups]})
    vocab = workloads.vocab_size(model)
    prompt = workloads.token_ids(vocab, 64, 0)
    batch = workloads.make_batch(model, 2, 128, 1)
    small = {"inference": {"prompt_tokens": 64, "gen_tokens": 8}, "training": {"batch": 2, "seq": 128}}

    def prepare():
        fused = fusion.prepare(model, doc, traced)
        return fused

    def forward():
        fused = prepare()
        fused.on()
        mx.eval(model(prompt[None]))
        fused.off()

    def train():
        fused = prepare()
        fused.on()
        workloads.run_training_step(model, batch)
        fused.off()

    def gate_only():
        fused = prepare()
        gate.check(model, doc, dtype=args.dtype, prompt=prompt, batch=batch, fused=fused)

    def inference():
        evaluate.evaluate(model, doc, dtype=args.dtype, pairs=2, warmup=0, skip_training=True, traced=traced, **small)

    def training():
        evaluate.evaluate(model, doc, dtype=args.dtype, pairs=2, warmup=0, skip_inference=True, traced=traced, **small)

    stages = [
        ("prepare", prepare),
        ("forward", forward),
        ("train", train),
        ("gate", gate_only),
        ("inference", inference),
        ("training", training),
    ]
    base = active_mib()
    print(
        f"# {args.model} {args.dtype} on {mx.default_device()}: active {base:.0f} MiB after load; objects already frozen (gc.freeze) before any measurement: {gc.get_freeze_count()}"
    )
    print(
        f"{'stage':10s} "
        + " ".join(f"{'after ' + str(i + 1):>10s}" for i in range(args.repeats))
        + "   (MiB above the previous row's end)"
    )
    last = base
    for name, fn in stages:
        cells = []
        for _ in range(args.repeats):
            fn()
            now = active_mib()
            cells.append(f"{now - last:+10.0f}")
            last = now
        alive = sum(1 for o in gc.get_objects() if isinstance(o, fusion.Instance))
        print(f"{name:10s} " + " ".join(cells) + f"   fusion instances alive: {alive}", flush=True)
    print(f"# total above load: {last - base:+.0f} MiB")


if __name__ == "__main__":
    main()
