"""The patch is reached, native is bit-identical, split is within tolerance, remove restores stock."""

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx.utils import tree_flatten

from tilewise import gate, models, patch, workloads
from tilewise import policy as P

PROMPT_LEN = 5


def forward(model, m=PROMPT_LEN, seed=3):
    ids = workloads.token_ids(model.args.vocab_size, m, seed)
    out = model(ids[None])
    mx.eval(out)
    return out


def linear_layers(model):
    return [(n, m) for n, m in model.named_modules() if type(m) in patch.PATCHED or type(m) in patch.PATCHED.values()]


def test_instance_attribute_patching_does_nothing(model):
    """Why patch.py swaps classes: Python looks `__call__` up on the type."""
    layer = model.model.layers[0].mlp.up_proj
    x = mx.ones((1, layer.weight.shape[1]))
    before = layer(x)
    layer.__call__ = lambda x: mx.zeros((1, 1))  # what a naive patch would do
    try:
        assert mx.array_equal(layer(x), before).item()
    finally:
        del layer.__dict__["__call__"]


def test_patch_is_reached_and_counts_calls_per_plan_kind(model):
    # head (N = vocab) split; gate/up (N = 128) native; everything else split along K.
    doc = P.make_policy(
        rules=[
            {"n": [1024, 1024], "plan": P.split_plan(None, 256, None)},
            {"n": [128, 128], "plan": {"kind": "native"}},
        ],
        default=P.split_plan(None, None, 32),
    )
    handle = patch.apply(model, doc)
    # 2 layers x (q, k, v, o, gate, up, down) + the tied head.
    assert len(handle.layers) == 15
    patch.reset_call_counts()
    forward(model)
    assert patch.call_counts() == {"native": 4, "split": 11, "kernel": 0}
    # Generation of G=4 tokens from 8: generate_step prefills 7 tokens, steps the 8th, then runs G
    # more single-token forwards (it computes one step ahead): 6 forward passes.
    patch.reset_call_counts()
    workloads.run_inference(model, workloads.token_ids(1024, 8, 1), 4)
    counts = patch.call_counts()
    assert counts["native"] == 4 * 6 and counts["split"] == 11 * 6, counts
    # M is decided per call: a rule on M picks the plan at call time.
    patch.apply(
        model, P.make_policy(rules=[{"m": [1, 1], "plan": {"kind": "native"}}], default=P.split_plan(2, None, None))
    )
    patch.reset_call_counts()
    forward(model, m=1)
    forward(model, m=3)
    assert patch.call_counts() == {"native": 15, "split": 15, "kernel": 0}


def test_native_is_bit_identical_to_stock(model):
    ids = workloads.token_ids(1024, 12, 4)
    stock_logits = model(ids[None])
    stock_tokens = workloads.run_inference(model, ids, 8)["tokens"]
    batch = workloads.make_batch(model, 2, 16, 5)
    stock_loss, stock_grads = workloads.loss_and_grads(model, batch)

    patch.apply(model, P.native())
    patch.reset_call_counts()
    logits = model(ids[None])
    assert mx.array_equal(logits, stock_logits).item()
    assert patch.call_counts()["native"] == 15
    assert workloads.run_inference(model, ids, 8)["tokens"] == stock_tokens
    loss, grads = workloads.loss_and_grads(model, batch)
    assert mx.array_equal(loss, stock_loss).item()
    ref = dict(tree_flatten(stock_grads))
    for name, g in tree_flatten(grads):
        assert mx.array_equal(g, ref[name]).item(), name


@pytest.mark.parametrize(
    "plan",
    [
        P.split_plan(2, None, None),  # M tiles
        P.split_plan(None, 16, None),  # N tiles (through q/k/v biases)
        P.split_plan(None, None, 16),  # K tiles: partial products summed
        P.split_plan(3, 7, 24),  # uneven tiles on every axis
        P.split_plan(1048576, 1048576, 1048576),  # tiles larger than the matrix: no split
    ],
)
def test_split_is_within_tolerance(model, plan):
    stock = forward(model, m=7)
    patch.apply(model, P.make_policy(default=plan))
    out = forward(model, m=7)
    assert out.shape == stock.shape
    err = gate.rel_err(out, stock)
    assert err <= gate.tolerance("float32"), err
    assert patch.call_counts()["split"] == 15


def test_split_of_one_layer_matches_a_float64_reference():
    """Checks the tiling arithmetic directly (bias, uneven tiles, 3-D input) against numpy."""
    import numpy as np

    mx.random.seed(0)
    layer = nn.Linear(40, 30, bias=True)
    x = mx.random.normal((2, 5, 40))
    ref = np.asarray(x, dtype=np.float64) @ np.asarray(layer.weight, dtype=np.float64).T + np.asarray(layer.bias)
    patch.apply(layer, P.make_policy(default=P.split_plan(3, 7, 9)))
    y = layer(x)
    assert y.shape == (2, 5, 30)
    assert np.max(np.abs(np.asarray(y) - ref)) < 1e-5
    patch.plant_bug("drop_last_k_tile")
    assert np.max(np.abs(np.asarray(layer(x)) - ref)) > 1e-2


def test_remove_restores_stock_exactly(model):
    names_before = [n for n, _ in tree_flatten(model.parameters())]
    stock = forward(model)
    patch.apply(model, P.make_policy(default=P.split_plan(None, None, 16)))
    assert [n for n, _ in tree_flatten(model.parameters())] == names_before  # no wrapper modules
    assert patch.applied_policy(model) is not None
    assert patch.remove(model) == 15
    for name, layer in linear_layers(model):
        assert type(layer) in patch.PATCHED, name
        assert "_tw_resolver" not in layer.__dict__
    assert patch.applied_policy(model) is None
    patch.reset_call_counts()
    assert mx.array_equal(forward(model), stock).item()
    assert patch.call_counts() == {"native": 0, "split": 0, "kernel": 0}


def test_bad_policy_is_refused_before_patching(model):
    with pytest.raises(P.PolicyError):
        patch.apply(model, {"schema": "tilewise.policy/1"})
    assert patch.applied_policy(model) is None


def test_quantized_layers_and_quantized_tied_head(tiny):
    model, _, info = models.load_model(info_path(tiny))
    nn.quantize(model, group_size=32, bits=4)
    kinds = {type(m) for _, m in model.named_modules()}
    assert nn.QuantizedLinear in kinds and nn.QuantizedEmbedding in kinds
    stock = forward(model, m=6)

    patch.apply(model, P.native())
    assert mx.array_equal(forward(model, m=6), stock).item()
    assert patch.call_counts()["native"] == 15

    for plan in (P.split_plan(4, 16, None), P.split_plan(None, None, 32), P.split_plan(None, None, 40)):
        patch.apply(model, P.make_policy(default=plan))
        patch.reset_call_counts()
        err = gate.rel_err(forward(model, m=6), stock)
        assert err <= gate.tolerance("float32"), (plan, err)
        assert patch.call_counts()["split"] == 15
    patch.remove(model)
    assert mx.array_equal(forward(model, m=6), stock).item()
    assert models.model_shapes(model) == models.model_shapes(tiny[0])


def test_kernel_plan_on_quantized_weights_is_a_plan_error(tiny):
    model, _, _ = models.load_model(info_path(tiny))
    nn.quantize(model, group_size=32, bits=4)
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
    patch.apply(model, P.make_policy(default=kernel))
    with pytest.raises(patch.PlanError):
        forward(model)


def info_path(tiny):
    return tiny[2]["model_path"]


def test_kernel_plans_route_to_kernel_matmul_with_weight_and_bias(model, monkeypatch):
    """The kernel itself is the kernels package's (tested on GPUs); here: the patch hands it the
    right operands for every layer kind and counts the calls. On CPU the real one is unavailable,
    so a reference stands in for it."""
    import tilewise.kernels

    seen = []

    def reference_kernel(x, w, plan, bias=None):
        seen.append((x.shape, w.shape, bias is not None, plan["family"]))
        y = x @ w.T
        return y + bias if bias is not None else y

    monkeypatch.setattr(tilewise.kernels, "kernel_matmul", reference_kernel)
    gemm = {
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
    stock = forward(model, m=6)
    patch.apply(model, P.make_policy(default=gemm))
    out = forward(model, m=6)
    assert patch.call_counts() == {"native": 0, "split": 0, "kernel": 15}
    assert gate.rel_err(out, stock) <= 1e-6
    assert ((1, 6, 64), (1024, 64), False, "gemm") in seen  # the tied head, leading dims kept
    assert sum(1 for s in seen if s[2]) == 6  # q, k, v carry a bias in both layers


def test_reachable_only_leaves_layers_that_stay_native_stock(model):
    head = {"n": [1024, 1024], "plan": P.split_plan(None, 256, None)}
    h = patch.apply(model, P.make_policy(rules=[head]), reachable_only=True)
    assert h.layers == ["model.embed_tokens"]
    assert type(model.model.layers[0].mlp.up_proj) is nn.Linear
    assert patch.apply(model, P.native(), reachable_only=True).layers == []
    # A native rule covering every M for (128, 64) shields gate/up from a split default.
    shielded = P.make_policy(
        rules=[{"n": [128, 128], "k": [64, 64], "plan": {"kind": "native"}}], default=P.split_plan(None, None, 32)
    )
    assert len(patch.apply(model, shielded, reachable_only=True).layers) == 15 - 4
    # A native rule for M=1 only does not: larger M still reaches the split default.
    decode_only = P.make_policy(rules=[{"m": [1, 1], "plan": {"kind": "native"}}], default=P.split_plan(None, None, 32))
    assert len(patch.apply(model, decode_only, reachable_only=True).layers) == 15
    # Re-applying replaces the previous policy entirely.
    assert len(patch.apply(model, P.make_policy(rules=[head]), reachable_only=True).layers) == 1
    assert type(model.model.layers[0].mlp.up_proj) is nn.Linear


def test_may_leave_native():
    split = P.split_plan(None, None, 32)
    assert not P.may_leave_native(P.native(), 64, 64)
    assert P.may_leave_native(P.make_policy(default=split), 64, 64)
    doc = P.make_policy(rules=[{"n": [1, 100], "m": [1, None], "plan": {"kind": "native"}}], default=split)
    assert not P.may_leave_native(doc, 64, 64) and P.may_leave_native(doc, 128, 64)
    doc = P.make_policy(rules=[{"m": [5, 9], "k": [64, 64], "plan": split}])
    assert P.may_leave_native(doc, 10, 64) and not P.may_leave_native(doc, 10, 65)


def test_dispatch_is_per_n_and_k_and_per_input_size():
    """Plans are memoised per (N, K) and keyed by x.size (M = x.size // K). Two layers with the same
    N but different K can see the same x.size at different M: each must get its own M's plan, and
    inputs of one M in any layout (batch and sequence dims) share one."""

    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(16, 8, bias=False)  # N = 8, K = 16
            self.b = nn.Linear(32, 8, bias=False)  # N = 8, K = 32

    model = Two()
    mx.eval(model.parameters())
    # M = 2 is split; every other M native.
    doc = P.make_policy(rules=[{"m": [2, 2], "plan": P.split_plan(None, 4, None)}], default={"kind": "native"})
    patch.apply(model, doc)
    try:
        patch.reset_call_counts()
        model.b(mx.ones((2, 32)))  # M = 2, x.size 64: split
        assert patch.call_counts() == {"native": 0, "split": 1, "kernel": 0}
        model.a(mx.ones((4, 16)))  # M = 4, x.size 64 too: must be native, not b's split
        assert patch.call_counts() == {"native": 1, "split": 1, "kernel": 0}
        for shape in [(1, 2, 32), (2, 1, 32)]:  # M = 2 in other layouts: split again
            model.b(mx.ones(shape))
        model.a(mx.ones((1, 4, 16)))
        assert patch.call_counts() == {"native": 2, "split": 3, "kernel": 0}
    finally:
        patch.remove(model)
