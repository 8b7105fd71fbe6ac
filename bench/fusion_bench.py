#!/usr/bin/env python3
"""Fusion delivered: a model with its policy applied by the plugin vs stock mlx_lm, side by side in one
process, on what people run — decode at batch 1 and 8, a long prefill, a training step.

Two copies of the same model are loaded with `mlx_lm.load` (through tilewise.models): `stock` is left
alone; `tuned` gets the policy the way every mlx_lm process gets it (`tilewise.plugin.apply_to`, from the
daemon or a policy file), so what is timed is what ships: the plugin's fusion (concatenated weights,
originals released), its patched layers if any. Each workload runs interleaved pairs (tilewise.measure:
warm-ups, alternating order, GC paused); the ratio of a pair is stock seconds / tuned seconds (> 1:
tuned is faster); median and bootstrap 95 % interval.

  decode1   mlx_lm.generate.generate_step on a P-token prompt, G greedy tokens; time = first to last
            token (G - 1 steps, pipelined exactly as mlx_lm generates)
  decode8   B prompts of P tokens prefilled (untimed), then G pipelined greedy steps of the batch
            (model(y[:, None], cache), argmax, async_eval of step n+1 before waiting on step n)
  prefill   mlx_lm's time to first token for one L-token prompt (fresh cache, L-1 tokens, then 1)
  train     one full step (forward, cross-entropy, value_and_grad, AdamW), weights restored after
            (tilewise.workloads.run_training_step)

Correctness: last-position logits of both copies on the same input (bit-identical or relative error),
greedy tokens of decode1/decode8 equal. Memory: parameter bytes of both copies, and the peak above the
process's active memory while the plugin fused (`mx.get_peak_memory`).

Usage (CPU, tiny model, policy from a file or the daemon of TILEWISE_HOME):
  .venv/bin/python bench/fusion_bench.py --model synthetic:tiny --policy P.json --out results/cpu/fusion
  .venv/bin/python bench/fusion_bench.py --model synthetic:tiny --from-daemon ...
A policy proven for one model can be measured on a quantized copy with --quantize 4 --retarget (the
policy's target model is rewritten to the quantized model's fingerprint; the output says so).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "evaluator"))

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402
from mlx_lm.generate import generate_step, generation_stream  # noqa: E402
from mlx_lm.models.cache import make_prompt_cache  # noqa: E402

from tilewise import fusion, gate, measure, models, plugin, workloads  # noqa: E402

LOG: list = []
WORKLOADS = ("decode1", "decode8", "prefill", "train")


def say(line=""):
    print(line, flush=True)
    LOG.append(line)


def sync():
    mx.synchronize(generation_stream)
    mx.synchronize()


def decode1(model, prompt, gen):
    sync()
    tokens, t_first = [], None
    for tok, _ in generate_step(prompt, model, max_tokens=gen):
        if t_first is None:
            t_first = time.perf_counter()
        tokens.append(tok)
    seconds = time.perf_counter() - t_first
    sync()
    return {"seconds": seconds, "tokens": tokens}


def decode_batch(model, prompts, gen):
    cache = make_prompt_cache(model)
    with mx.stream(generation_stream):
        y = mx.argmax(model(prompts, cache=cache)[:, -1, :], axis=-1)
    mx.eval(y, [c.state for c in cache])
    sync()

    def step(t):
        with mx.stream(generation_stream):
            return mx.argmax(model(t[:, None], cache=cache)[:, -1, :], axis=-1)

    out = [y.tolist()]
    t0 = time.perf_counter()
    nxt = step(y)
    mx.async_eval(nxt)
    for i in range(gen):
        cur = nxt
        if i < gen - 1:
            nxt = step(cur)
            mx.async_eval(nxt)
        out.append(cur.tolist())
    seconds = time.perf_counter() - t0
    sync()
    return {"seconds": seconds, "tokens": out}


def prefill(model, prompt):
    sync()
    t0 = time.perf_counter()
    cache = make_prompt_cache(model)
    with mx.stream(generation_stream):
        model(prompt[None, :-1], cache=cache)
        mx.eval([c.state for c in cache])
        y = mx.argmax(model(prompt[None, -1:], cache=cache)[:, -1, :], axis=-1)
        mx.eval(y)
    return {"seconds": time.perf_counter() - t0}


def train_step(model, batch):
    r = workloads.run_training_step(model, batch)
    return {"seconds": r["seconds"], "loss": r["loss"]}


def last_logits(model, ids):
    cache = make_prompt_cache(model)
    with mx.stream(generation_stream):
        out = model(ids, cache=cache)[:, -1, :].astype(mx.float32)
    mx.eval(out)
    sync()
    return out


def param_bytes(model):
    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))


def load(spec, dtype, quantize, group_size):
    """(model, fingerprint of the model as loaded, before any quantization)."""
    model, tok, info = models.load_model(spec, dtype=dtype)
    if quantize:
        nn.quantize(model, group_size=group_size, bits=quantize)
        mx.eval(model.parameters())
    return model, info["model_fingerprint"]


def policy_source(args, tuned, loaded_fingerprint):
    """The policy file or daemon the plugin reads, retargeted to `tuned` when asked."""
    if args.from_daemon:
        if not args.retarget:
            return None, "the daemon (TILEWISE_HOME)"
        from tilewise.daemon_client import DaemonClient

        with DaemonClient(timeout=10) as c:
            c.hello()
            want = plugin.this_target(tuned)
            base = args.retarget_from or loaded_fingerprint
            answer = c.policy_get(base, want["mlx"], want["backend"])
        doc = answer["policy"] if isinstance(answer["policy"], dict) else json.loads(answer["policy"])
        note = f"the daemon's best for {base}"
    else:
        doc = json.loads(Path(args.policy).read_text())
        note = f"policy file {args.policy}"
    if args.retarget:
        doc = dict(doc, target=dict(doc["target"], model=models.fingerprint(tuned), device="*"))
        note += ", retargeted to this model's fingerprint (device '*')"
    path = Path(tempfile.mkdtemp()) / "policy.json"
    path.write_text(json.dumps(doc))
    return str(path), note


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="synthetic:tiny")
    ap.add_argument("--dtype", default=None, help="cast the weights (float32, bfloat16, float16)")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--policy", help="a policy JSON file")
    src.add_argument("--from-daemon", action="store_true", help="ask the daemon of TILEWISE_HOME")
    ap.add_argument("--quantize", type=int, default=0, help="nn.quantize both copies to this many bits")
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--retarget", action="store_true", help="measure the policy on this (e.g. quantized) model")
    ap.add_argument(
        "--retarget-from",
        default=None,
        help="with --from-daemon --retarget: whose best to take (default: the model as loaded, before --quantize)",
    )
    ap.add_argument("--only", default=",".join(WORKLOADS))
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--gen", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--batch-gen", type=int, default=64)
    ap.add_argument("--prefill", type=int, default=512)
    ap.add_argument("--train-batch", type=int, default=4)
    ap.add_argument("--train-seq", type=int, default=512)
    ap.add_argument("--pairs", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--budget-s", type=float, default=1e9, help="skip workloads once this much time has passed")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--tag", default="")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    only = [w for w in args.only.split(",") if w]
    bad = [w for w in only if w not in WORKLOADS]
    if bad:
        ap.error(f"unknown workload {bad[0]} (known: {', '.join(WORKLOADS)})")

    stock, _ = load(args.model, args.dtype, args.quantize, args.group_size)
    tuned, loaded_fingerprint = load(args.model, args.dtype, args.quantize, args.group_size)
    source, note = policy_source(args, tuned, loaded_fingerprint)
    stock_bytes = param_bytes(stock)
    gc.collect()
    active = mx.get_active_memory()
    mx.reset_peak_memory()
    tic = time.perf_counter()
    rec = plugin.apply_to(tuned, source)
    apply_s = time.perf_counter() - tic
    peak_extra = mx.get_peak_memory() - active
    env = {
        "date_utc": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "mlx": mx.__version__,
        "backend": workloads.backend(),
        "device": workloads.device_name(),
        "python": sys.version.split()[0],
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "model": args.model,
        "model_fingerprint": rec.model_fingerprint,
        "dtype": models.model_dtype(stock),
        "quantize": args.quantize or None,
        "policy": note,
        "args": {k: str(v) for k, v in vars(args).items()},
    }
    report = {"env": env, "record": rec.as_dict(), "results": {}, "skipped": []}
    say(
        f"# fusion_bench {args.tag}  {env['date_utc']}  mlx {env['mlx']} {env['backend']} ({env['device']})  "
        f"model {args.model} {env['dtype']}{f' q{args.quantize}' if args.quantize else ''}  {rec.model_fingerprint}"
    )
    say(f"# policy: {note}: {rec.source}, {rec.policy_hash}; {rec.reason}")
    calls = (fusion.count_linear_calls(stock, tokens=(0,)), fusion.count_linear_calls(tuned, tokens=(0,)))
    report["matmuls_per_token"] = calls
    report["memory"] = {
        "stock_param_bytes": stock_bytes,
        "tuned_param_bytes": param_bytes(tuned),
        "peak_above_active_while_applying": peak_extra,
        "apply_s": apply_s,
    }
    say(
        f"# applied in {apply_s * 1e3:.0f} ms: {plugin.describe_fusion(rec.fusion) if rec.fusion else 'no fusion'}; "
        f"{rec.patched_layers} layers patched; linear calls per token {calls[0]} -> {calls[1]}"
    )
    say(
        f"# parameters: stock {stock_bytes / 2**20:.1f} MiB, tuned {param_bytes(tuned) / 2**20:.1f} MiB; "
        f"peak above active while applying {peak_extra / 2**20:.1f} MiB"
    )
    if rec.source not in ("file", "daemon") or not rec.policy_hash:
        say("the plugin applied no policy: nothing to compare")
        (args.out / "fusion_bench.json").write_text(json.dumps(report, indent=1, default=str))
        return 1

    vocab = stock.args.vocab_size
    key = mx.random.key(args.seed)
    k1, k2, k3, k4 = mx.random.split(key, 4)
    p_dec = mx.random.randint(0, vocab, (args.prompt,), key=k1).astype(mx.int32)
    p_bat = mx.random.randint(0, vocab, (args.batch, args.prompt), key=k2).astype(mx.int32)
    p_pre = mx.random.randint(0, vocab, (args.prefill,), key=k3).astype(mx.int32)
    ids = mx.random.randint(0, vocab, (args.train_batch, args.train_seq + 1), key=k4).astype(mx.int32)
    batch = (ids[:, :-1], ids[:, 1:])
    mx.eval(p_dec, p_bat, p_pre, ids)

    s_log, t_log = last_logits(stock, p_dec[None]), last_logits(tuned, p_dec[None])
    report["logits"] = {
        "rel_err": gate.rel_err(t_log, s_log),
        "bit_identical": bool(mx.array_equal(s_log, t_log).item()),
    }
    say(
        f"# last-position logits: relative error {report['logits']['rel_err']:.2e}, "
        f"bit-identical {report['logits']['bit_identical']}"
    )

    runs = {
        "decode1": (f"decode B=1 P{args.prompt} G{args.gen}", lambda m: decode1(m, p_dec, args.gen), args.gen - 1),
        "decode8": (
            f"decode B={args.batch} P{args.prompt} G{args.batch_gen}",
            lambda m: decode_batch(m, p_bat, args.batch_gen),
            args.batch * args.batch_gen,
        ),
        "prefill": (f"prefill B=1 L{args.prefill} (time to first token)", lambda m: prefill(m, p_pre), None),
        "train": (f"training step B={args.train_batch} L{args.train_seq}", lambda m: train_step(m, batch), None),
    }
    rows = []
    for name in only:
        label, fn, tokens = runs[name]
        if time.perf_counter() - start > args.budget_s:
            say(f"{name}: skipped (budget of {args.budget_s:.0f} s spent)")
            report["skipped"].append(name)
            continue
        kept = {}

        def arm(model, which, fn=fn, kept=kept):
            def run():
                out = fn(model)
                if "tokens" in out:
                    kept.setdefault(which, out.pop("tokens"))
                return out

            return run

        t0 = time.perf_counter()
        r = measure.interleaved(
            {"stock": arm(stock, "stock"), "candidate": arm(tuned, "tuned")}, args.pairs, args.warmup, seed=args.seed
        )
        med = {a: sorted(s["seconds"] for s in r["samples"] if s["arm"] == a) for a in ("stock", "candidate")}
        med = {a: v[len(v) // 2] for a, v in med.items()}
        same = kept.get("stock") == kept.get("tuned") if kept else None
        row = {
            "workload": name,
            "label": label,
            "ratio": r["ratio"],
            "lo": r["lo"],
            "hi": r["hi"],
            "n_pairs": r["n_pairs"],
            "stock_s": med["stock"],
            "tuned_s": med["candidate"],
            "tokens_equal": same,
            "wall_s": time.perf_counter() - t0,
            "samples": r["samples"],
        }
        if tokens:
            row["stock_tok_s"] = tokens / med["stock"]
            row["tuned_tok_s"] = tokens / med["candidate"]
        report["results"][name] = row
        rows.append(row)
        line = (
            f"{name:8s} {label:38s} {r['ratio']:.3f} [{r['lo']:.3f}, {r['hi']:.3f}]  "
            f"stock {med['stock'] * 1e3:8.2f} ms  tuned {med['candidate'] * 1e3:8.2f} ms"
        )
        if tokens:
            line += f"  ({row['stock_tok_s']:.0f} -> {row['tuned_tok_s']:.0f} tok/s)"
        if same is not None:
            line += f"  greedy tokens equal: {same}"
        say(line + f"  [{row['wall_s']:.0f} s]")
        (args.out / "fusion_bench.json").write_text(json.dumps(report, indent=1, default=str))

    have = {r["workload"]: r for r in rows}
    if "decode1" in have and "train" in have:
        # The seed's objective: 0.7 x inference + 0.3 x training (decode B=1 stands for inference).
        c = measure.combine(
            {k: have["decode1"][k] for k in ("ratio", "lo", "hi")}, {k: have["train"][k] for k in ("ratio", "lo", "hi")}
        )
        report["combined"] = c
        say(f"combined 0.7 x decode1 + 0.3 x train: {c['ratio']:.3f} [{c['lo']:.3f}, {c['hi']:.3f}]")
    report["total_s"] = time.perf_counter() - start
    (args.out / "fusion_bench.json").write_text(json.dumps(report, indent=1, default=str))
    (args.out / "fusion_bench.txt").write_text("\n".join(LOG) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
