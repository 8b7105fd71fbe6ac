"""The correctness gate: a candidate policy must not change the model's outputs before it is timed.

Checks, in order (the first failure is the reason):
1. the candidate can run here (every kernel plan passes `kernels.kernel_supported`) and runs at all
   (an exception anywhere in it = incorrect, with its type and text);
2. logits of a full forward pass over the prompt: relative error vs stock within the dtype's tolerance;
3. greedy generation: the first `greedy_tokens` tokens are identical to stock's;
4. training: loss and gradients (global relative error over all trainable parameters) within
   the tolerance.

Relative error = ||candidate - stock||_2 / ||stock||_2, computed in float32.

Tolerances (TOLERANCE): float32 1e-4, float16 1e-2, bfloat16 3e-2. They are set above what a
legitimate reordering of the same sums produces (a K-split rounds partial sums separately) and far
below what a wrong plan produces (dropping one K tile gives O(0.1..1)). Measured on the tiny model
(CPU, evaluator/tests/test_gate.py prints them): float32 splits ~1e-7..1e-6 on logits and
gradients; bfloat16 splits up to ~1e-2 (bf16 keeps 8 mantissa bits, ~4e-3 per rounding, and a
K-split adds one rounding per tile through every layer). Greedy tokens stay the hard check: a plan
that flips an argmax is rejected whatever its relative error.
"""

import mlx.core as mx
from mlx.utils import tree_flatten

from . import fusion, patch, workloads

TOLERANCE = {"float32": 1e-4, "float16": 1e-2, "bfloat16": 3e-2}
GREEDY_TOKENS = 16


def tolerance(dtype):
    return TOLERANCE.get(str(dtype).split(".")[-1], TOLERANCE["bfloat16"])


def rel_err(candidate, reference):
    c = candidate.astype(mx.float32)
    r = reference.astype(mx.float32)
    num = mx.sqrt(mx.sum(mx.square(c - r)))
    den = mx.sqrt(mx.sum(mx.square(r)))
    return float((num / mx.maximum(den, 1e-30)).item())


def grads_rel_err(candidate, reference):
    """Global relative error over every gradient tensor (as if concatenated). Either argument may be
    a gradient tree or a flat {name: array} dict; the names must agree."""
    num = mx.array(0.0)
    den = mx.array(0.0)
    ref = reference if _is_flat(reference) else dict(tree_flatten(reference))
    cand = candidate if _is_flat(candidate) else dict(tree_flatten(candidate))
    if set(cand) != set(ref):
        missing = sorted(set(ref) ^ set(cand))[:3]
        raise ValueError(f"gradients of different parameters (e.g. {', '.join(missing)})")
    for name, g in cand.items():
        d = g.astype(mx.float32) - ref[name].astype(mx.float32)
        num = num + mx.sum(mx.square(d))
        den = den + mx.sum(mx.square(ref[name].astype(mx.float32)))
    return float((mx.sqrt(num) / mx.maximum(mx.sqrt(den), 1e-30)).item())


def _outputs(model, prompt, batch, greedy_tokens, for_training=None):
    """Logits, greedy tokens, and (with a batch) loss and gradients. `for_training(on)` is called
    around the training part (the candidate's fusion may be inference-only)."""
    logits = model(prompt[None])
    mx.eval(logits)
    tokens = workloads.run_inference(model, prompt, greedy_tokens)["tokens"]
    loss = grads = None
    if batch is not None:
        if for_training is not None:
            for_training(True)
        try:
            loss, grads = workloads.loss_and_grads(model, batch)
        finally:
            if for_training is not None:
                for_training(False)
    return logits, tokens, loss, grads


def check(
    model, doc, *, dtype, prompt, batch=None, greedy_tokens=GREEDY_TOKENS, stock=None, reachable_only=False, fused=None
):
    """Runs the gate for policy `doc` on `model`; returns the `gate` dict of docs/worker-protocol.md
    plus "correct". `stock` may pass precomputed stock outputs (from `stock_outputs`).
    `reachable_only` is passed to patch.apply. `fused` (fusion.prepare of the same policy, or None
    to prepare it here) is switched on for the candidate; its gradients are compared in the stock
    layout (each fused gradient cut into its members' rows). The model is left unpatched and
    unfused."""
    tol = tolerance(dtype)
    gate = {
        "logits_rel_err": None,
        "tolerance": tol,
        "greedy_tokens_equal": 0,
        "greedy_tokens_checked": greedy_tokens,
        "loss_rel_err": None,
        "grad_rel_err": None,
        "reason": None,
    }
    patch.remove(model)
    unsupported = _unsupported_kernel_plan(doc)
    if unsupported:
        gate["reason"] = unsupported
        return False, gate
    if stock is None:
        stock = stock_outputs(model, prompt, batch, greedy_tokens)
    s_logits, s_tokens, s_loss, s_grads = stock
    try:
        if fused is None:
            fused = fusion.prepare(model, doc)
        _, fuse_training = fusion.policy_groups(doc)

        def for_training(starting):
            # An inference-only fusion is off for the training part (as in the timed arm).
            if fuse_training or not fused.instances:
                return
            patch.remove(model)
            if starting:
                fused.off()
            else:
                fused.on()
            patch.apply(model, doc, reachable_only=reachable_only)

        fused.on()
        patch.apply(model, doc, reachable_only=reachable_only)
        c_logits, c_tokens, c_loss, c_grads = _outputs(model, prompt, batch, greedy_tokens, for_training)
        if c_grads is not None and fused.instances and fuse_training:
            c_grads = fused.to_stock(dict(tree_flatten(c_grads)))
    except Exception as e:  # any failure of the candidate makes it incorrect, never a crash
        gate["reason"] = f"candidate raised {type(e).__name__}: {e}"
        return False, gate
    finally:
        patch.remove(model)
        if fused is not None:
            fused.off()

    gate["logits_rel_err"] = rel_err(c_logits, s_logits)
    equal = 0
    for a, b in zip(c_tokens, s_tokens):
        if a != b:
            break
        equal += 1
    gate["greedy_tokens_equal"] = equal
    if batch is not None:
        gate["loss_rel_err"] = rel_err(c_loss, s_loss)
        gate["grad_rel_err"] = grads_rel_err(c_grads, s_grads)

    reasons = []
    if not gate["logits_rel_err"] <= tol:  # also catches NaN
        reasons.append(f"logits relative error {gate['logits_rel_err']:.3g} > {tol:g}")
    if equal < greedy_tokens:
        reasons.append(
            f"greedy token {equal} differs from stock ({c_tokens[equal] if equal < len(c_tokens) else None} vs {s_tokens[equal]})"
        )
    if batch is not None:
        if not gate["loss_rel_err"] <= tol:
            reasons.append(f"training loss relative error {gate['loss_rel_err']:.3g} > {tol:g}")
        if not gate["grad_rel_err"] <= tol:
            reasons.append(f"gradient relative error {gate['grad_rel_err']:.3g} > {tol:g}")
    gate["reason"] = "; ".join(reasons) or None
    return not reasons, gate


def _is_flat(tree):
    return isinstance(tree, dict) and all(isinstance(v, mx.array) for v in tree.values())


def _unsupported_kernel_plan(doc):
    """Why one of the policy's kernel plans cannot run here (kernels.kernel_supported), or None."""
    plans = [r["plan"] for r in doc["matmul"]["rules"]] + [doc["matmul"]["default"]]
    kernel_plans = [p for p in plans if p["kind"] == "kernel"]
    if not kernel_plans:
        return None
    try:
        from .kernels import kernel_supported
    except Exception as e:
        return f"kernel plans unavailable: {type(e).__name__}: {e}"
    for plan in kernel_plans:
        try:
            ok, why = kernel_supported(plan, workloads.backend())
        except Exception as e:
            ok, why = False, f"{type(e).__name__}: {e}"
        if not ok:
            return f"kernel plan not supported on {workloads.backend()}: {why}"
    return None


def stock_outputs(model, prompt, batch=None, greedy_tokens=GREEDY_TOKENS):
    """Stock logits, greedy tokens, loss and gradients (the model must be unpatched)."""
    return _outputs(model, prompt, batch, greedy_tokens)
