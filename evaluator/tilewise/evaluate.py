"""One candidate policy, end to end: the correctness gate, then interleaved inference and training
timing against stock. Produces the `evaluate` result of docs/worker-protocol.md.

Stock and candidate share the same loaded weights; the candidate arm applies the policy (class swap,
see patch.py) before its sample and removes it after, so the stock arm is the untouched model.

By default the candidate is applied as the plugin applies it (`reachable_only`): layers that no M
routes off native stay stock, so what is measured is what would ship, and `calls` counts the patched
layers' calls. `reachable_only=False` patches every layer (the bench uses it to measure the cost of
the patch mechanism itself with the native policy).
"""

from . import fusion, gate, measure, patch, policy, workloads


def evaluate(
    model,
    doc,
    *,
    dtype,
    inference=None,
    training=None,
    pairs=10,
    warmup=2,
    seed=0,
    progress=None,
    should_stop=None,
    skip_inference=False,
    skip_training=False,
    reachable_only=True,
    traced=None,
):
    """Gate first, then timing. `inference` = {prompt_tokens, gen_tokens}, `training` = {batch, seq};
    None picks the backend's defaults, skip_* leaves a workload out. `progress(stage, done, total)`
    reports; `should_stop()` is polled between samples (measure.Cancelled is raised). `traced` is the
    model's sibling trace (fusion.trace), taken once at load; None traces here when needed.

    A policy's fusion is built once per evaluation (the concatenated weights sit beside the stock
    ones) and switched on and off around each candidate sample with a few dict writes, so no sample
    pays for concatenation; the training arm runs fused only when the policy fuses for training."""
    policy.validate_for_backend(doc, workloads.backend())
    progress = progress or (lambda *a: None)
    inf = None if skip_inference else {"batch": 1, **workloads.defaults("inference"), **(inference or {})}
    trn = None if skip_training else {**workloads.defaults("training"), **(training or {})}
    vocab = workloads.vocab_size(model)
    prompt = workloads.token_ids(vocab, (inf or workloads.defaults("inference"))["prompt_tokens"], seed)
    batch = workloads.make_batch(model, trn["batch"], trn["seq"], seed + 1) if trn else None
    # A batched inference workload (what a batching server runs) times B prompts together; the
    # correctness gate still generates from the single prompt.
    prompts = None
    if inf is not None and inf["batch"] > 1:
        prompts = workloads.token_ids(vocab, inf["batch"] * inf["prompt_tokens"], seed + 2)
        prompts = prompts.reshape(inf["batch"], inf["prompt_tokens"])

    result = {
        "policy_hash": policy.content_hash(doc),
        "correct": False,
        "gate": None,
        "inference": None,
        "training": None,
        "combined": None,
        "calls": None,
        "fusion": None,
    }
    progress("gate", 0, 1)
    fused = fusion.prepare(model, doc, traced)
    if fusion.policy_groups(doc)[0]:
        result["fusion"] = fused.report()
    try:
        return _gate_and_time(
            model,
            doc,
            fused,
            result,
            dtype=dtype,
            inf=inf,
            trn=trn,
            prompt=prompt,
            prompts=prompts,
            batch=batch,
            pairs=pairs,
            warmup=warmup,
            seed=seed,
            progress=progress,
            should_stop=should_stop,
            reachable_only=reachable_only,
        )
    finally:
        fused.off()


def _gate_and_time(
    model,
    doc,
    fused,
    result,
    *,
    dtype,
    inf,
    trn,
    prompt,
    prompts,
    batch,
    pairs,
    warmup,
    seed,
    progress,
    should_stop,
    reachable_only,
):
    patch.reset_call_counts()
    correct, gate_report = gate.check(
        model, doc, dtype=dtype, prompt=prompt, batch=batch, reachable_only=reachable_only, fused=fused
    )
    # Counts of the gate's candidate run: proof that the plans were reached.
    result["calls"] = patch.call_counts()
    result["gate"] = gate_report
    result["correct"] = correct
    progress("gate", 1, 1)
    if not correct:
        return result

    prefill_step = (doc.get("generation") or {}).get("prefill_step_size", 2048)

    prepared = patch.prepare(doc)
    _, fuse_training = fusion.policy_groups(doc)

    def with_policy(fn, training=False):
        use_fusion = not training or fuse_training

        def run():
            if use_fusion:
                fused.on()
            patch.apply(model, prepared, reachable_only=reachable_only)
            try:
                return fn()
            finally:
                patch.remove(model)
                fused.off()

        return run

    def without_policy(fn):
        # The stock arm does the same (untimed) bookkeeping walks, so both arms start alike.
        def run():
            patch.remove(model)
            fused.off()
            return fn()

        return run

    if inf is not None:

        def generate(step):
            if prompts is None:
                return workloads.run_inference(model, prompt, inf["gen_tokens"], step, should_stop=should_stop)
            return workloads.run_batch_inference(model, prompts, inf["gen_tokens"], step, should_stop=should_stop)

        run_stock = without_policy(lambda: generate(2048))
        run_cand = with_policy(lambda: generate(prefill_step))
        r = measure.interleaved(
            {"stock": run_stock, "candidate": run_cand},
            pairs,
            warmup,
            seed=seed,
            should_stop=should_stop,
            on_sample=lambda d, t: progress("inference", d, t),
        )
        r["prefill_tok_s"] = _tok_s(r["samples"], "prefill_s", inf["prompt_tokens"] * inf["batch"])
        r["decode_tok_s"] = _tok_s(r["samples"], "decode_s", max(inf["gen_tokens"] - 1, 1) * inf["batch"])
        # The same statistic over each phase of the generation alone (secondary: what a user of
        # decode or of long prompts would see).
        for phase in ("prefill", "decode"):
            r[phase] = _phase_ratio(r["samples"], f"{phase}_s", seed)
        r["sizes"] = inf
        result["inference"] = r
    if trn is not None:
        run_stock = without_policy(lambda: workloads.run_training_step(model, batch))
        run_cand = with_policy(lambda: workloads.run_training_step(model, batch), training=True)
        r = measure.interleaved(
            {"stock": run_stock, "candidate": run_cand},
            pairs,
            warmup,
            seed=seed,
            should_stop=should_stop,
            on_sample=lambda d, t: progress("training", d, t),
        )
        r["sizes"] = trn
        result["training"] = r
    result["combined"] = measure.combine(result["inference"], result["training"])
    return result


def _phase_ratio(samples, field, seed):
    """{ratio, lo, hi} of the per-pair ratios stock / candidate of one field of the samples."""
    by_pair = {}
    for s in samples:
        by_pair.setdefault(s["pair"], {})[s["arm"]] = s[field]
    ratios = [p["stock"] / p["candidate"] for p in by_pair.values() if len(p) == 2 and p["candidate"] > 0]
    if not ratios:
        return None
    ratio, lo, hi = measure.median_ci(ratios, seed=seed)
    return {"ratio": ratio, "lo": lo, "hi": hi}


def _tok_s(samples, field, tokens):
    """Tokens/s per arm from the median of that arm's `field` seconds."""
    import numpy as np

    out = {}
    for arm in ("stock", "candidate"):
        secs = [s[field] for s in samples if s["arm"] == arm]
        out[arm] = tokens / float(np.median(secs)) if secs else None
    return out
