"""The correctness gate and the end-to-end evaluation on the real tiny model."""

import pytest

from tilewise import evaluate as E
from tilewise import gate, patch, workloads
from tilewise import policy as P

SMALL = {"inference": {"prompt_tokens": 24, "gen_tokens": 16}, "training": {"batch": 2, "seq": 16}}


def run_gate(model, doc, dtype="float32"):
    prompt = workloads.token_ids(model.args.vocab_size, 24, 0)
    batch = workloads.make_batch(model, 2, 16, 1)
    ok, g = gate.check(model, doc, dtype=dtype, prompt=prompt, batch=batch)
    assert patch.applied_policy(model) is None  # the gate always leaves the model stock
    return ok, g


def test_native_passes_with_zero_error(model):
    ok, g = run_gate(model, P.native())
    assert ok and g["reason"] is None
    assert g["logits_rel_err"] == 0.0 and g["loss_rel_err"] == 0.0 and g["grad_rel_err"] == 0.0
    assert g["greedy_tokens_equal"] == g["greedy_tokens_checked"] == 16


@pytest.mark.parametrize("plan", [P.split_plan(None, None, 16), P.split_plan(5, 24, 40)])
def test_split_passes_within_tolerance(model, plan):
    ok, g = run_gate(model, P.make_policy(default=plan))
    print("split gate errors:", plan, g)
    assert ok, g["reason"]
    assert 0 < g["grad_rel_err"] <= g["tolerance"] == gate.TOLERANCE["float32"]


def test_planted_wrong_plan_is_rejected(model):
    patch.plant_bug("drop_last_k_tile")
    ok, g = run_gate(model, P.make_policy(default=P.split_plan(None, None, 32)))
    assert not ok
    assert "logits relative error" in g["reason"] and g["logits_rel_err"] > 1e-2
    assert g["grad_rel_err"] > g["tolerance"]


def test_a_candidate_that_raises_is_incorrect_not_a_crash(model):
    patch.plant_bug("raise")
    ok, g = run_gate(model, P.make_policy(default=P.split_plan(None, None, 32)))
    assert not ok and g["reason"].startswith("candidate raised PlanError: planted bug")


def test_a_kernel_plan_that_cannot_run_here_is_rejected(model):
    kernel = {
        "kind": "kernel",
        "backend": "cuda",
        "family": "gemm",
        "block_m": 32,
        "block_n": 32,
        "block_k": 16,
        "warps": 4,
        "vector_width": 4,
        "split_k": 1,
    }
    ok, g = run_gate(model, P.make_policy(default=kernel))  # target "*": schema-valid anywhere
    assert not ok and "kernel" in g["reason"]


def test_incorrect_candidate_gets_no_timing(model):
    patch.plant_bug("drop_last_k_tile")
    r = E.evaluate(
        model, P.make_policy(default=P.split_plan(None, None, 32)), dtype="float32", pairs=2, warmup=0, **SMALL
    )
    assert r["correct"] is False
    assert r["inference"] is None and r["training"] is None and r["combined"] is None
    assert r["calls"]["split"] > 0


PAIRS = 24

# How much slower than stock the native policy routed through the patch may measure before the test
# calls it a bias. Every linear call of the candidate pays the patch's dispatch (a dict lookup and a
# counter, ~0.3 µs): on this tiny model, whose matmuls take microseconds, that is a real 0–2 % cost
# (quiet box, six seeds: inference 0.982–1.000, three of six intervals wholly below 1). Under a
# concurrent build the intervals widen and that cost alone put inference below 1 twice in a row
# (0.978 [0.834, 0.995], then 0.942 [0.889, 0.987]). A cost is not a promotion risk; a dispatch path
# gone wrong (plans resolved per call, a copy per call) costs far more than 5 %.
PATCH_COST_MARGIN = 0.05


def test_a_a_interval_contains_one(model):
    """Candidate = the native policy, every layer routed through the patch: stock and candidate
    compute the same thing, so the interval must not lie above 1.0 (promotion needs lo > 1) and may
    lie below it only by the patch's small dispatch cost (`PATCH_COST_MARGIN`).

    Three 95 % intervals (inference, training, combined) all contain 1.0 by chance in only about
    90 % of runs even when nothing is wrong (CI saw training 1.054 [1.001, 1.170] once). So a run
    whose intervals miss is repeated once with another seed, and the test fails only if that one
    misses too ON THE SAME SIDE for the same workload — as the promotion rule promotes only what a
    second, independent measurement confirms. A real bias is one-sided and shows in both runs, while
    CI once saw noise miss both ways (inference 0.964 [0.910, 0.985], then 1.028 [1.005, 1.076]).
    Above 1 a miss is any lower bound over 1.0 (that is what a false promotion needs); below, an
    upper bound under 1 - PATCH_COST_MARGIN."""

    # Longer samples than SMALL: they are less at the mercy of other processes on a shared machine.
    # Every layer patched (reachable_only=False): the candidate really runs through the patch.
    def run(seed):
        stages = []
        r = E.evaluate(
            model,
            P.native(),
            dtype="float32",
            pairs=PAIRS,
            warmup=2,
            seed=seed,
            inference={"prompt_tokens": 64, "gen_tokens": 32},
            training={"batch": 4, "seq": 64},
            progress=lambda *a: stages.append(a),
            reachable_only=False,
        )
        return r, stages

    def misses(r):
        """{workload: +1 if the interval lies above 1.0, -1 if below 1 - margin} for those that miss."""
        out = {}
        for w in ("inference", "training", "combined"):
            if r[w]["lo"] > 1.0:
                out[w] = 1
            elif r[w]["hi"] < 1.0 - PATCH_COST_MARGIN:
                out[w] = -1
        return out

    def show(r):
        return {w: (r[w]["ratio"], r[w]["lo"], r[w]["hi"]) for w in ("inference", "training", "combined")}

    r, stages = run(11)
    assert r["correct"]
    first = misses(r)
    if first:
        print("first run missed (chance, or a bias: the second run decides):", show(r))
        r, stages = run(12)
        assert r["correct"]
        twice = {w: side for w, side in misses(r).items() if first.get(w) == side}
        assert not twice, ("missed on the same side twice", twice, show(r))
    for work in ("inference", "training"):
        w = r[work]
        print(work, w["ratio"], w["lo"], w["hi"])
        assert w["n_pairs"] == PAIRS and len(w["samples"]) == 2 * PAIRS
    assert r["policy_hash"] == P.content_hash(P.native())
    assert r["calls"]["native"] > 0 and r["calls"]["split"] == 0
    inf = r["inference"]
    assert inf["prefill_tok_s"]["stock"] > 0 and inf["decode_tok_s"]["candidate"] > 0
    assert all(s["prefill_s"] > 0 and s["decode_s"] > 0 for s in inf["samples"])
    assert inf["peak_memory"]["stock"] > 0 and inf["peak_memory"]["candidate"] > 0
    assert ("gate", 1, 1) in stages and ("inference", PAIRS, PAIRS) in stages and ("training", PAIRS, PAIRS) in stages


def test_training_step_restores_the_weights(model):
    import mlx.core as mx
    from mlx.utils import tree_flatten

    before = dict(tree_flatten(model.parameters()))
    batch = workloads.make_batch(model, 2, 16, 1)
    a = workloads.run_training_step(model, batch, learning_rate=1e-2)
    b = workloads.run_training_step(model, batch, learning_rate=1e-2)
    assert a["loss"] == b["loss"]  # same weights at the start of each step
    for name, v in tree_flatten(model.parameters()):
        assert mx.array_equal(v, before[name]).item(), name


def test_candidate_is_applied_as_shipped_by_default(model):
    """Only layers a policy can route off native are patched (as the plugin does): a head-only
    policy patches one layer, and its calls are the only ones counted."""
    head_only = P.make_policy(rules=[{"n": [1024, 1024], "m": [2, None], "plan": P.split_plan(None, 256, None)}])
    r = E.evaluate(model, head_only, dtype="float32", pairs=2, warmup=0, **SMALL)
    assert r["correct"]
    # Gate: logits over the prompt (M=24: split), then greedy generation (prefill split, decode native).
    assert r["calls"]["split"] >= 2 and r["calls"]["native"] >= 15
    assert r["calls"]["native"] + r["calls"]["split"] < 15 * 4  # far fewer than all 15 layers' calls
    native = E.evaluate(model, P.native(), dtype="float32", pairs=2, warmup=0, **SMALL)
    assert native["calls"] == {"native": 0, "split": 0, "kernel": 0}  # nothing patched at all
