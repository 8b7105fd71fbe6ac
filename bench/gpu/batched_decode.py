"""Batched decode end to end: does the tuned kernel policy speed up decoding B sequences together?

The tuned policy's rules (bench/gpu/e2e_bench.py `tuned_rules`: kernel plans whose per-op wall-time
interval lies above 1 in kernel_bench.json) are all GEMV plans at M = 2–16, which the evaluator's
workloads (batch-1 decode M = 1, prefill, training) never produce. Decoding B sequences at once makes
every linear see M = B. For each B this script:

- builds a fixed batch of B seeded prompts of P tokens (same length, no padding);
- one sample = prefill with an mlx_lm KV cache (`make_prompt_cache`; untimed), then G timed greedy
  decode steps, each `model(tokens[:, None], cache=cache)`, argmax, `mx.eval` (synchronous: every
  step's host and GPU work is on the clock, nothing is pipelined across steps);
- times stock vs the policy in interleaved pairs with alternating order (`tilewise.measure.interleaved`:
  warm-ups, every raw sample kept, ratio = stock s / policy s per pair, median with a bootstrap 95 %
  interval); the policy is applied before and removed after each of its samples, as the evaluator does
  (`reachable_only`, as the plugin ships it);
- counts the plan calls of one decode step under the policy (`patch.call_counts`): 0 kernel calls at
  B = 1 (no rule for M = 1), so B = 1 is an A/A control of the dispatch;
- compares the policy's logits of the first decode step with stock's (relative error in float32, as the
  gate computes it) and the greedy tokens of the first step and of all G steps.

`--policy native` (an all-native policy patched onto every linear) runs the same loop anywhere, e.g. as
a CPU smoke test with `--model synthetic:tiny`; a tuned policy whose kernel plans the backend cannot run
is refused up front.

Usage: python bench/gpu/batched_decode.py --out DIR [--kernel-results kernel_bench.json]
       [--batches 1,4,8,16] [--prompt-tokens 128] [--gen-tokens 32] [--pairs 10] [--warmup 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "evaluator"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from e2e_bench import tuned_rules  # noqa: E402

DEFAULT_KR = ROOT / "results/h100/run8-kernels-full/kernel_bench.json"


def build_policy(kind, kernel_results, target):
    """(policy doc, rules source, reachable_only) for `--policy`."""
    from tilewise import policy

    if kind == "native":
        # Every linear patched, every call native: the dispatch path itself, counted.
        return policy.make_policy([], name="native (all layers patched)", target=target), None, False
    src = Path(kernel_results)
    if not src.is_file():
        sys.exit(f"kernel results {src} not found: run bench/gpu/kernel_bench.py first")
    rules = tuned_rules(json.loads(src.read_text()))
    doc = policy.make_policy(rules, name="tuned kernels (wall-time wins per shape)", target=target)
    return doc, str(src), True


def check_runnable(doc):
    """Exits with the reason when this backend cannot run the policy's plans (e.g. CUDA kernels on CPU)."""
    from tilewise import gate, policy
    from tilewise import workloads as W

    try:
        policy.validate_for_backend(doc, W.backend())
    except policy.PolicyError as e:
        sys.exit(f"policy refused on backend {W.backend()}: {e}\n(use --policy native to smoke-test here)")
    why = gate._unsupported_kernel_plan(doc)
    if why:
        sys.exit(f"{why}\n(use --policy native to smoke-test here)")


def prompt_batch(model, batch, prompt_tokens, seed):
    from tilewise import workloads as W

    return W.token_ids(W.vocab_size(model), batch * prompt_tokens, seed).reshape(batch, prompt_tokens)


def prefill(model, prompts):
    """A fresh KV cache filled with the prompts; returns (cache, first greedy tokens [B])."""
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    logits = model(prompts, cache=cache)
    tok = mx.argmax(logits[:, -1, :], axis=-1)
    mx.eval(tok, [(c.keys, c.values) for c in cache])
    return cache, tok


def decode_step(model, cache, tok):
    """One greedy step for the whole batch: (logits [B, V], next tokens [B]), evaluated."""
    import mlx.core as mx

    logits = model(tok[:, None], cache=cache)[:, -1, :]
    nxt = mx.argmax(logits, axis=-1)
    mx.eval(logits, nxt)
    return logits, nxt


def run_sample(model, prompts, gen_tokens):
    """One sample: untimed prefill, then `gen_tokens` timed decode steps."""
    import mlx.core as mx

    t0 = time.perf_counter()
    cache, tok = prefill(model, prompts)
    prefill_s = time.perf_counter() - t0
    cpu = time.process_time()
    tic = time.perf_counter()
    for _ in range(gen_tokens):
        logits = model(tok[:, None], cache=cache)
        tok = mx.argmax(logits[:, -1, :], axis=-1)
        mx.eval(tok)
    seconds = time.perf_counter() - tic
    return {"seconds": seconds, "prefill_s": prefill_s, "cpu_s": time.process_time() - cpu}


def with_policy(model, prepared, reachable_only, fn):
    from tilewise import patch

    patch.apply(model, prepared, reachable_only=reachable_only)
    try:
        return fn()
    finally:
        patch.remove(model)


def correctness(model, prompts, gen_tokens, prepared, reachable_only):
    """Policy vs stock: first decode step's logits and greedy tokens, and the plan calls of one step."""
    import mlx.core as mx

    from tilewise import gate, patch

    def greedy():
        cache, tok0 = prefill(model, prompts)
        patch.reset_call_counts()
        logits1, tok = decode_step(model, cache, tok0)
        calls = patch.call_counts()
        toks = [tok0, tok]
        for _ in range(gen_tokens - 1):
            _, tok = decode_step(model, cache, tok)
            toks.append(tok)
        return logits1, mx.stack(toks, axis=1), calls  # tokens [B, 1 + G]

    patch.remove(model)
    s_logits, s_toks, _ = greedy()
    c_logits, c_toks, calls = with_policy(model, prepared, reachable_only, greedy)
    same = s_toks == c_toks
    mx.eval(same)
    b = same.shape[0]
    # Steps (from the prefill's token on) until the first step where any sequence differs.
    all_rows = mx.all(same, axis=0).tolist()
    steps_equal = next((i for i, ok in enumerate(all_rows) if not ok), len(all_rows))
    return {
        "logits_rel_err": gate.rel_err(c_logits, s_logits),
        "prefill_tokens_equal": int(mx.sum(same[:, 0]).item()),
        "step1_tokens_equal": int(mx.sum(same[:, 1]).item()),
        "batch": b,
        "greedy_steps_all_equal": steps_equal,
        "greedy_steps_checked": len(all_rows),
        "calls_per_step": calls,
    }


def tok_s(samples, arm, tokens):
    ts = [s["seconds"] for s in samples if s["arm"] == arm]
    return tokens / statistics.median(ts) if ts else None


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--kernel-results", type=Path, default=DEFAULT_KR)
    ap.add_argument("--policy", choices=("tuned", "native"), default="tuned")
    ap.add_argument("--model", default="synthetic:qwen2.5-0.5b")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--batches", default="1,4,8,16", help="comma-separated B values")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--gen-tokens", type=int, default=32)
    ap.add_argument("--pairs", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--budget-s",
        type=float,
        default=None,
        help="skip the remaining B values once this many seconds have passed since start",
    )
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    batches = [int(b) for b in args.batches.split(",") if b]
    start = time.perf_counter()

    import mlx.core as mx
    import mlx_lm

    from tilewise import measure, models, patch
    from tilewise import workloads as W

    t0 = time.perf_counter()
    model, _tok, info = models.load_model(args.model, dtype=args.dtype)
    print(f"loaded {args.model} ({info['model_fingerprint']}) in {time.perf_counter() - t0:.1f} s", flush=True)
    target = {
        "device": W.device_name(),
        "model": info["model_fingerprint"],
        "mlx": mx.__version__,
        "backend": "cuda" if args.policy == "tuned" else W.backend(),
    }
    doc, src, reachable_only = build_policy(args.policy, args.kernel_results, target)
    check_runnable(doc)
    rules = doc["matmul"]["rules"]
    print(
        f"policy {args.policy}: {len(rules)} rules"
        + (f" from {src}" if src else "")
        + f", reachable_only={reachable_only}",
        flush=True,
    )
    for r in rules:
        print(f"  m {r['m']} n {r['n'][0]} k {r['k'][0]}: {r['plan']}", flush=True)
    prepared = patch.prepare(doc)

    env = {
        "device": W.device_name(),
        "backend": W.backend(),
        "mlx": mx.__version__,
        "mlx_lm": getattr(mlx_lm, "__version__", None),
        "python": sys.version.split()[0],
        "date_utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    report = {
        "env": env,
        "args": {k: str(v) for k, v in vars(args).items()},
        "model": info,
        "policy": doc,
        "kernel_results": src,
        "reachable_only": reachable_only,
        "batches": {},
        "skipped": [],
    }
    json_path = args.out / "batched_decode.json"

    for b in batches:
        if args.budget_s is not None and time.perf_counter() - start > args.budget_s:
            print(f"B={b}: skipped (budget {args.budget_s:.0f} s spent)", flush=True)
            report["skipped"].append(b)
            continue
        t0 = time.perf_counter()
        prompts = prompt_batch(model, b, args.prompt_tokens, args.seed + b)
        mx.eval(prompts)
        corr = correctness(model, prompts, args.gen_tokens, prepared, reachable_only)
        print(
            f"B={b}: calls per decode step {corr['calls_per_step']}, first-step logits rel err "
            f"{corr['logits_rel_err']:.2e}, step-1 tokens equal {corr['step1_tokens_equal']}/{b}, "
            f"greedy steps all equal {corr['greedy_steps_all_equal']}/{corr['greedy_steps_checked']}",
            flush=True,
        )

        def stock(prompts=prompts):
            patch.remove(model)  # the same (untimed) bookkeeping walk as the policy arm's
            return run_sample(model, prompts, args.gen_tokens)

        def cand(prompts=prompts):
            return with_policy(model, prepared, reachable_only, lambda: run_sample(model, prompts, args.gen_tokens))

        r = measure.interleaved({"stock": stock, "candidate": cand}, args.pairs, args.warmup, seed=args.seed)
        tokens = b * args.gen_tokens
        r["stock_tok_s"] = tok_s(r["samples"], "stock", tokens)
        r["policy_tok_s"] = tok_s(r["samples"], "candidate", tokens)
        r["correctness"] = corr
        r["wall_s"] = time.perf_counter() - t0
        report["batches"][str(b)] = r
        report["total_s"] = time.perf_counter() - start
        json_path.write_text(json.dumps(report, indent=1, default=str))
        print(
            f"B={b}: stock {r['stock_tok_s']:.0f} tok/s, {args.policy} {r['policy_tok_s']:.0f} tok/s, "
            f"ratio {r['ratio']:.3f} [{r['lo']:.3f}, {r['hi']:.3f}] ({r['n_pairs']} pairs, {r['wall_s']:.1f} s)",
            flush=True,
        )

    report["total_s"] = time.perf_counter() - start
    json_path.write_text(json.dumps(report, indent=1, default=str))
    text = table(report, args)
    print()
    print(text)
    (args.out / "batched_decode.txt").write_text(text + "\n")


def table(report, args):
    env = report["env"]
    lines = [
        f"{env['date_utc']}  {env['device']}  mlx {env['mlx']}  {args.model} {args.dtype}  policy {args.policy}  "
        f"P {args.prompt_tokens}  G {args.gen_tokens}  pairs {args.pairs}  warmup {args.warmup}  "
        f"total {report['total_s']:.0f} s",
        "decode tok/s = B x G / median decode seconds of the arm; ratio = median over pairs of stock s / policy s "
        "[bootstrap 95 %]; calls = plan calls of one decode step under the policy",
        f"{'B':>3} {'stock tok/s':>12} {args.policy + ' tok/s':>12} {'ratio [95 % CI]':>24} "
        f"{'kernel':>7} {'native':>7} {'rel err':>9} {'tok eq':>7} {'steps eq':>9}",
    ]
    for b, r in report["batches"].items():
        c = r["correctness"]
        lines.append(
            f"{b:>3} {r['stock_tok_s']:>12.0f} {r['policy_tok_s']:>12.0f} "
            f"{r['ratio']:>8.3f} [{r['lo']:.3f}, {r['hi']:.3f}] "
            f"{c['calls_per_step']['kernel']:>7} {c['calls_per_step']['native']:>7} {c['logits_rel_err']:>9.2e} "
            f"{c['step1_tokens_equal']:>3}/{c['batch']:<3} {c['greedy_steps_all_equal']:>4}/{c['greedy_steps_checked']:<4}"
        )
    if report["skipped"]:
        lines.append(f"skipped (budget): B = {report['skipped']}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
