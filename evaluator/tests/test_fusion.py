"""Sibling fusion on tiny models built with mlx_lm's own classes: which groups the trace finds, how
many matmuls a forward pass runs, outputs, gradients, quantized layers, bad groups, and the stock
layout coming back bit for bit."""

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx.utils import tree_flatten
from mlx_lm.tuner.utils import linear_to_lora_layers
from mlx_lm.utils import _get_classes

from tilewise import evaluate, fusion, gate, models, patch, workloads
from tilewise import policy as P

BASE = dict(
    hidden_size=64,
    num_hidden_layers=2,
    intermediate_size=128,
    num_attention_heads=4,
    num_key_value_heads=2,
    rms_norm_eps=1e-5,
    vocab_size=256,
)
ARCHS = {
    "qwen2": dict(tie_word_embeddings=True),
    "llama": dict(tie_word_embeddings=False),
    "mistral": dict(tie_word_embeddings=False),
    "gemma2": dict(head_dim=16),
    "phi3": dict(),
    "qwen2_moe": dict(
        num_experts_per_tok=2, num_experts=4, moe_intermediate_size=32, shared_expert_intermediate_size=64
    ),
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
}
QKV = ("q_proj", "k_proj", "v_proj")
GATE_UP = ("gate_proj", "up_proj")
# The groups the trace must find per architecture (members only; scopes vary).
EXPECTED = {
    "qwen2": {QKV, GATE_UP},
    "llama": {QKV, GATE_UP},
    "mistral": {QKV, GATE_UP},
    "gemma2": {QKV, GATE_UP},
    "phi3": set(),  # qkv_proj and gate_up_proj are already one matmul each
    # attention; the shared expert's gate/up; the router and the shared expert's gate read the same x
    "qwen2_moe": {QKV, GATE_UP, ("gate", "shared_expert_gate")},
    "mixtral": {QKV},  # the experts are SwitchLinear / lists: left alone
}


def build(model_type, dtype=mx.float32, seed=0, **extra):
    config = dict(BASE, model_type=model_type, **ARCHS.get(model_type, {}), **extra)
    model_cls, args_cls = _get_classes(config)
    mx.random.seed(seed)
    model = model_cls(args_cls.from_dict(config))
    model.set_dtype(dtype)
    model.eval()
    mx.eval(model.parameters())
    return model


def policy_for(model, groups=None):
    groups = fusion.groups_of(model) if groups is None else groups
    return P.make_policy(fusion={"groups": [{"scope": g["scope"], "members": g["members"]} for g in groups]})


def logits(model, ids):
    out = model(ids)
    mx.eval(out)
    return out


def ids(n=7, vocab=256, seed=1):
    return workloads.token_ids(vocab, n, seed)[None]


@pytest.fixture(autouse=True)
def no_planted_fusion_bug():
    fusion.plant_bug(None)
    yield
    fusion.plant_bug(None)


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_architectures_fuse_their_siblings_with_the_same_outputs(arch):
    model = build(arch)
    groups = fusion.groups_of(model)
    assert {tuple(g["members"]) for g in groups} == EXPECTED[arch]
    for g in groups:
        assert g["count"] == BASE["num_hidden_layers"], g
        assert "*" in g["scope"], g
    stock_calls = fusion.count_linear_calls(model)
    x = ids()
    ref = logits(model, x)
    fused = fusion.prepare(model, policy_for(model, groups))
    assert fused.skipped == []
    fused.on()
    try:
        saved = sum(g["count"] * (len(g["members"]) - 1) for g in groups)
        assert fusion.count_linear_calls(model) == stock_calls - saved
        out = logits(model, x)
    finally:
        fused.off()
    # Exactly stock on this CPU (each output element is reduced in the same order); the gate's
    # float32 tolerance is the contract elsewhere.
    assert gate.rel_err(out, ref) <= gate.tolerance("float32")
    assert mx.array_equal(mx.argmax(out, -1), mx.argmax(ref, -1)).item()
    if arch in ("qwen2", "llama"):
        assert mx.array_equal(out, ref).item(), "fused logits differ from stock"
    # Switched off, the model is stock again (classes, parameter names).
    assert fusion.count_linear_calls(model) == stock_calls
    assert mx.array_equal(logits(model, x), ref).item()


def test_qwen2_decode_step_calls():
    """The 0.5B model's count on the tiny config: 7 linears per layer + the tied head -> 4 fewer per
    layer fused (169 -> 97 at 24 layers)."""
    model = build("qwen2", num_hidden_layers=24)
    assert fusion.count_linear_calls(model, tokens=(3,)) == 169
    fused = fusion.fuse(model, policy_for(model))
    assert fusion.count_linear_calls(model, tokens=(3,)) == 97
    assert fused.calls_saved() == 72
    assert fused.summary() == "q/k/v fused in 24 modules, gate/up fused in 24 modules"


def test_lora_wrapped_layers_are_left_unfused():
    model = build("qwen2")
    model.freeze()
    linear_to_lora_layers(model, 1, {"rank": 4, "scale": 10.0, "dropout": 0.0})  # the last layer
    groups = fusion.groups_of(model)
    # Only layer 0 (count 1) has plain siblings.
    assert [(g["scope"], tuple(g["members"]), g["count"]) for g in groups] == [
        ("model.layers.*.self_attn", QKV, 1),
        ("model.layers.*.mlp", GATE_UP, 1),
    ], groups
    x = ids()
    ref = logits(model, x)
    fused = fusion.fuse(model, policy_for(model, groups))
    assert [i.name for i in fused.instances] == ["model.layers.0.self_attn", "model.layers.0.mlp"]
    assert type(model.model.layers[1].self_attn.q_proj).__name__ == "LoRALinear"
    assert mx.array_equal(logits(model, x), ref).item()
    # The pattern matches layer 1 too: its LoRA layers are left alone, with the reason.
    skipped = {m: r for m, _, r in fused.skipped}
    assert set(skipped) == {"model.layers.1.self_attn", "model.layers.1.mlp"}
    assert "LoRALinear, not a plain Linear" in skipped["model.layers.1.self_attn"]
    fusion.unfuse(model)


def loss_fn(model, inputs, targets):
    return nn.losses.cross_entropy(model(inputs).astype(mx.float32), targets, reduction="mean")


def test_gradients_through_the_fused_weight_are_the_stock_gradients_concatenated():
    model = build("qwen2")
    model.train()
    batch = workloads.token_ids(256, 2 * 9, 4).reshape(2, 9)
    inputs, targets = batch[:, :-1], batch[:, 1:]
    loss_s, grads_s = nn.value_and_grad(model, loss_fn)(model, inputs, targets)
    fused = fusion.prepare(model, policy_for(model))
    fused.on()
    try:
        loss_f, grads_f = nn.value_and_grad(model, loss_fn)(model, inputs, targets)
    finally:
        fused.off()
    mx.eval(loss_s, grads_s, loss_f, grads_f)
    flat_s, flat_f = dict(tree_flatten(grads_s)), dict(tree_flatten(grads_f))
    # The fused weight has a gradient of its own, the concatenation of the members' gradients.
    g = flat_f["model.layers.0.self_attn.q_proj+k_proj+v_proj.weight"]
    want = mx.concatenate([flat_s[f"model.layers.0.self_attn.{m}.weight"] for m in QKV], axis=0)
    assert g.shape == want.shape
    assert gate.rel_err(g, want) < 1e-5
    assert not any(k.endswith("q_proj.weight") for k in flat_f), "members hold no parameters while fused"
    stock_layout = fused.to_stock(flat_f)
    assert set(stock_layout) == set(flat_s)
    assert gate.grads_rel_err(stock_layout, flat_s) < 1e-5
    assert gate.rel_err(loss_f, loss_s) < 1e-6


def test_inference_only_fusion_runs_members_alone_in_training_mode():
    model = build("qwen2")
    x = ids()
    ref = logits(model, x)
    doc = P.make_policy(
        fusion={"groups": [{"scope": "model.layers.*.self_attn", "members": list(QKV)}], "training": False}
    )
    fusion.fuse(model, doc)
    assert fusion.count_linear_calls(model) == 15 - 2 * 2
    model.train()
    assert fusion.count_linear_calls(model) == 15, "each member alone while training"
    assert gate.rel_err(logits(model, x), ref) < 1e-6
    _, grads = nn.value_and_grad(model, loss_fn)(model, x[:, :-1], x[:, 1:])
    g = dict(tree_flatten(grads))["model.layers.0.self_attn.q_proj+k_proj+v_proj.weight"]
    assert float(mx.abs(g).sum()) > 0, "the fused weight gets gradients through the slices"
    model.eval()
    fusion.unfuse(model)


def test_quantized_siblings_fuse_when_bits_and_groups_agree():
    model = build("qwen2")
    nn.quantize(model, group_size=32, bits=4)
    x = ids()
    ref = logits(model, x)
    stock_calls = fusion.count_linear_calls(model)
    groups = fusion.groups_of(model)
    assert {tuple(g["members"]) for g in groups} == {QKV, GATE_UP}
    fused = fusion.fuse(model, policy_for(model, groups))
    assert not fused.skipped
    fused_layer = model.model.layers[0].self_attn["q_proj+k_proj+v_proj"]
    assert type(fused_layer) is nn.QuantizedLinear and fused_layer.weight.shape[0] == 64 + 32 + 32
    assert fusion.count_linear_calls(model) == stock_calls - 6
    assert mx.array_equal(logits(model, x), ref).item()
    fusion.unfuse(model)

    # Members quantized differently stay separate, with the reason.
    model = build("qwen2")
    nn.quantize(
        model,
        group_size=32,
        bits=4,
        class_predicate=lambda path, m: isinstance(m, nn.Linear) and not path.endswith("k_proj"),
    )
    nn.quantize(model, group_size=32, bits=8, class_predicate=lambda path, m: path.endswith("k_proj"))
    fused = fusion.fuse(
        model, P.make_policy(fusion={"groups": [{"scope": "model.layers.*.self_attn", "members": list(QKV)}]})
    )
    assert not fused.instances
    assert len(fused.skipped) == 2 and "differ in quantization" in fused.skipped[0][2], fused.skipped


class TwoInputs(nn.Module):
    """A module whose two linears read different inputs (not siblings)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 8)

    def __call__(self, x):
        return self.b(self.a(x))


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(16, 8)
        self.block = TwoInputs()

    def __call__(self, ids):
        return self.block(self.embed(ids))


def test_bad_groups_stay_unfused_with_the_reason_and_change_nothing():
    model = build("qwen2")
    x = ids()
    ref = logits(model, x)
    model.model.layers[1].self_attn.k_proj.set_dtype(mx.float16)
    doc = P.make_policy(
        fusion={
            "groups": [
                {"scope": "model.layers.*.self_attn", "members": list(QKV)},
                {"scope": "model.layers.*.mlp", "members": ["gate_proj", "missing_proj"]},
                {"scope": "model.encoder.*.attn", "members": ["q", "k"]},
            ]
        }
    )
    fused = fusion.fuse(model, doc)
    reasons = {(m, tuple(g)): r for m, g, r in fused.skipped}
    assert len(fused.instances) == 1  # layer 0's attention
    assert "differ in dtype" in reasons[("model.layers.1.self_attn", QKV)]
    assert reasons[("model.layers.0.mlp", ("gate_proj", "missing_proj"))] == "has no layer 'missing_proj'"
    assert reasons[("model.encoder.*.attn", ("q", "k"))] == "no module of the model matches this scope"
    assert gate.rel_err(logits(model, x), ref) < 1e-3  # k_proj of layer 1 now runs in float16
    fusion.unfuse(model)

    toy = Toy()
    mx.eval(toy.parameters())
    assert fusion.groups_of(toy) == []
    fused = fusion.fuse(toy, P.make_policy(fusion={"groups": [{"scope": "block", "members": ["a", "b"]}]}))
    assert not fused.instances
    assert fused.skipped == [("block", ("a", "b"), "its members did not read the same input in a traced forward pass")]


def test_a_sibling_called_with_another_input_still_computes_its_own_output():
    model = build("qwen2")
    attn = model.model.layers[0].self_attn
    k_weight, k_bias = attn.k_proj.weight, attn.k_proj.bias
    fusion.fuse(model, policy_for(model))
    x = mx.random.normal((3, 64), key=mx.random.key(9))
    y = mx.random.normal((3, 64), key=mx.random.key(10))
    q = attn.q_proj(x)
    k_other = attn.k_proj(y)  # not the input q just used
    assert mx.allclose(k_other, y @ k_weight.T + k_bias, atol=1e-5).item()
    assert attn.v_proj(x).shape == (3, 32) and q.shape == (3, 64)
    fusion.unfuse(model)


def test_fuse_releases_the_originals_and_unfuse_restores_stock_bit_for_bit(models_dir):
    model, _, info = models.load_model("synthetic:tiny")
    before = dict(tree_flatten(model.parameters()))
    classes = {n: type(m) for n, m in model.named_modules()}
    x = ids(vocab=model.args.vocab_size)
    ref = logits(model, x)
    fused = fusion.fuse(model, policy_for(model))
    during = dict(tree_flatten(model.parameters()))
    # Steady state: the same bytes as stock (the fused arrays replace the members').
    nbytes = lambda d: sum(v.nbytes for v in d.values())  # noqa: E731
    assert abs(nbytes(during) - nbytes(before)) <= 0.01 * nbytes(before)
    assert not any(k.endswith(".q_proj.weight") for k in during)
    assert mx.array_equal(logits(model, x), ref).item()
    assert fusion.fused_of(model) is fused
    assert fusion.unfuse(model) == 4
    after = dict(tree_flatten(model.parameters()))
    assert list(after) == list(before)
    for k in before:
        assert after[k].dtype == before[k].dtype and mx.array_equal(after[k], before[k]).item(), k
    assert {n: type(m) for n, m in model.named_modules()} == classes
    assert models.fingerprint(model) == info["model_fingerprint"]
    assert fusion.unfuse(model) == 0


def test_the_gate_rejects_a_planted_wrong_fusion(tiny):
    model, _, info = tiny
    doc = policy_for(model)
    prompt = workloads.token_ids(model.args.vocab_size, 12, 0)
    fusion.plant_bug("rotate_parts")
    ok, g = gate.check(model, doc, dtype=info["dtype"], prompt=prompt)
    assert not ok
    assert g["reason"], g
    fusion.plant_bug(None)
    ok, g = gate.check(model, doc, dtype=info["dtype"], prompt=prompt)
    assert ok, g
    assert g["logits_rel_err"] == 0.0


def test_evaluate_measures_the_fusion_and_reports_it(tiny):
    model, _, info = tiny
    r = evaluate.evaluate(
        model,
        policy_for(model),
        dtype=info["dtype"],
        pairs=2,
        warmup=0,
        inference={"prompt_tokens": 16, "gen_tokens": 4},
        training={"batch": 1, "seq": 16},
    )
    assert r["correct"], r["gate"]
    assert r["fusion"]["instances"] == 4 and r["fusion"]["calls_saved_per_forward"] == 6
    assert r["gate"]["grad_rel_err"] < 1e-5
    assert r["inference"]["n_pairs"] == 2 and r["training"]["n_pairs"] == 2
    # The model is left stock.
    assert fusion.count_linear_calls(model) == 15
    assert not any("+" in k for k, _ in tree_flatten(model.parameters()))
    assert patch.call_counts()["split"] == 0
