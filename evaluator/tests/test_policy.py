"""Policy validation, plan lookup and content hash, in step with daemon/src/policy.rs."""

import json
from pathlib import Path

import pytest

from tilewise import policy as P

REPO = Path(__file__).resolve().parents[2]
# The same value daemon/src/policy.rs computes for schema/native.policy.json.
NATIVE_HASH = "sha256:b5c5f01fd672334217fd12e93311f34d9ab689b8bab57a4810c03e949ad4b33a"


def base(rules, default, backend="cuda"):
    return {
        "schema": "tilewise.policy/1",
        "target": {"device": "d1", "model": "m1", "mlx": "0.32.4", "backend": backend},
        "matmul": {"rules": rules, "default": default},
    }


def paths(err):
    return [p for p, _ in err.value.errors]


@pytest.mark.parametrize("name", ["policy.schema.json", "native.policy.json"])
def test_packaged_copies_are_byte_identical_to_repo_files(name):
    packaged = Path(P.__file__).parent / "data" / name
    assert packaged.read_bytes() == (REPO / "schema" / name).read_bytes(), (
        f"copy evaluator/tilewise/data/{name} from schema/{name}"
    )


def test_source_checkout_uses_the_shared_schema_file():
    assert P.schema_path() == REPO / "schema" / "policy.schema.json"


def test_native_hash_is_pinned_to_the_rust_value():
    assert P.content_hash(P.native()) == NATIVE_HASH
    assert P.content_hash(P.load(REPO / "schema" / "native.policy.json")) == NATIVE_HASH


def test_hash_ignores_key_order_and_whitespace():
    a = '{"schema":"tilewise.policy/1","target":{"device":"*","model":"*","mlx":"*","backend":"*"},"matmul":{"rules":[],"default":{"kind":"native"}},"name":"native"}'
    b = '{ "name": "native", "matmul": {"default": {"kind": "native"}, "rules": []},\n "target": {"backend": "*", "mlx": "*", "model": "*", "device": "*"}, "schema": "tilewise.policy/1"}'
    assert P.content_hash(P.loads(a)) == P.content_hash(P.loads(b)) == NATIVE_HASH
    assert P.canonical_json(P.loads(b)) == (
        '{"matmul":{"default":{"kind":"native"},"rules":[]},"name":"native",'
        '"schema":"tilewise.policy/1","target":{"backend":"*","device":"*","mlx":"*","model":"*"}}'
    )
    # Non-ASCII is hashed as UTF-8, not escaped (same bytes as serde_json).
    doc = P.native()
    doc["name"] = "naïve"
    assert "naïve" in P.canonical_json(doc)
    assert P.content_hash(doc) != NATIVE_HASH


def test_native_is_all_native():
    p = P.native()
    assert P.is_all_native(p)
    assert P.plan_for(p, 1, 896, 896) == {"kind": "native"}


def test_first_matching_rule_wins():
    p = P.validate(
        base(
            [
                {"m": [1, 1], "plan": {"kind": "native"}},
                {"m": [2, None], "n": [100000, None], "plan": P.split_plan(512, 16384, None)},
            ],
            P.split_plan(None, None, 256),
        )
    )
    assert P.plan_for(p, 1, 151936, 896) == {"kind": "native"}
    assert P.plan_for(p, 7, 151936, 896) == P.split_plan(512, 16384, None)
    assert P.plan_for(p, 7, 896, 896) == P.split_plan(None, None, 256)
    assert not P.is_all_native(p)


def test_schema_errors_name_the_field():
    with pytest.raises(P.PolicyError) as e:
        P.validate(base([{"m": [1, 4], "plan": P.split_plan(0)}], {"kind": "native"}))
    assert paths(e) == ["matmul.rules[0].plan.tile_m"]
    assert "matmul.rules[0].plan.tile_m" in str(e.value)

    with pytest.raises(P.PolicyError) as e:
        P.validate(base([], {"kind": "warp-drive"}))
    assert paths(e) == ["matmul.default"]
    assert "unknown plan kind 'warp-drive'" in str(e.value)

    with pytest.raises(P.PolicyError) as e:
        P.validate(base([], {"kind": "split", "tile_m": 4}))
    assert paths(e) == ["matmul.default", "matmul.default"]
    assert "'tile_n' is a required property" in str(e.value)

    doc = base([], {"kind": "native"})
    doc["surprise"] = 1
    with pytest.raises(P.PolicyError) as e:
        P.validate(doc)
    assert paths(e) == ["(root)"]

    with pytest.raises(P.PolicyError) as e:
        P.validate(base([{"m": [1, "x"], "plan": {"kind": "native"}}], {"kind": "native"}))
    assert paths(e) == ["matmul.rules[0].m[1]"]

    with pytest.raises(P.PolicyError) as e:
        P.loads("{not json")
    assert paths(e) == ["(root)"] and "not JSON" in str(e.value)

    with pytest.raises(P.PolicyError):
        P.validate([1, 2])


def test_cross_field_checks_match_docs_policy_md():
    with pytest.raises(P.PolicyError) as e:
        P.validate(base([{"m": [9, 4], "plan": {"kind": "native"}}], {"kind": "native"}))
    assert e.value.errors == [("matmul.rules[0].m", "lo > hi (9 > 4)")]

    gemv = {"kind": "kernel", "backend": "cuda", "family": "gemv", "rows_per_block": 4, "vector_width": 8, "split_k": 1}
    # gemv as default (unbounded M) is refused; in a rule with m <= 16 it is fine.
    with pytest.raises(P.PolicyError) as e:
        P.validate(base([], gemv))
    assert paths(e) == ["matmul.default"] and "gemv serves only M <= 16" in str(e.value)
    with pytest.raises(P.PolicyError) as e:
        P.validate(base([{"m": [1, 32], "plan": gemv}], {"kind": "native"}))
    assert paths(e) == ["matmul.rules[0].plan"]
    no_rows = dict(gemv)
    del no_rows["rows_per_block"]
    with pytest.raises(P.PolicyError) as e:
        P.validate(base([{"m": [1, 16], "plan": no_rows}], {"kind": "native"}))
    assert e.value.errors == [("matmul.rules[0].plan.rows_per_block", "gemv needs rows_per_block")]

    ok = P.validate(base([{"m": [1, 16], "plan": gemv}], {"kind": "native"}))
    # ... but not on a machine without CUDA.
    with pytest.raises(P.PolicyError) as e:
        P.validate_for_backend(ok, "metal")
    assert "target.backend" in paths(e)
    assert ("matmul.rules[0].plan.backend", "kernel backend cuda not available on metal") in e.value.errors
    P.validate_for_backend(ok, "cuda")

    metal_on_cuda = {
        "kind": "kernel",
        "backend": "metal",
        "family": "gemm",
        "block_m": 32,
        "block_n": 32,
        "block_k": 16,
        "warps": 4,
        "vector_width": 4,
        "split_k": 1,
    }
    with pytest.raises(P.PolicyError) as e:
        P.validate(base([], metal_on_cuda))
    assert "not available on cuda" in e.value.errors[0][1]

    gemm_missing = {"kind": "kernel", "backend": "cuda", "family": "gemm", "vector_width": 4, "split_k": 1}
    with pytest.raises(P.PolicyError) as e:
        P.validate(base([], gemm_missing))
    assert paths(e) == [
        "matmul.default.block_m",
        "matmul.default.block_n",
        "matmul.default.block_k",
        "matmul.default.warps",
    ]


def test_wildcard_target_runs_anywhere():
    for backend in ("cpu", "cuda", "metal"):
        P.validate_for_backend(P.native(), backend)
    with pytest.raises(P.PolicyError) as e:
        P.validate_for_backend(P.validate(base([], {"kind": "native"})), "cpu")
    assert e.value.errors == [("target.backend", "policy is for cuda, this machine runs cpu")]


def test_native_returns_a_fresh_copy():
    p = P.native()
    p["name"] = "changed"
    assert P.native()["name"] == "native"
    assert json.loads(P.canonical_json(P.native()))["name"] == "native"


def test_fusion_groups_validate_with_the_rust_messages():
    """Same paths and texts as policy.rs `fusion_groups_validate_and_a_layer_joins_one_group`."""
    doc = P.make_policy(
        fusion={
            "groups": [
                {"scope": "model.layers.*.self_attn", "members": ["q_proj", "k_proj", "v_proj"]},
                {"scope": "model.layers.*.mlp", "members": ["gate_proj", "up_proj"]},
            ]
        }
    )
    assert len(P.fusion_groups(doc)) == 2 and P.is_all_native(doc) and not P.is_stock(doc)
    doc["fusion"]["groups"][1] = {"scope": "model.layers.3.self_attn", "members": ["v_proj", "o_proj"]}
    with pytest.raises(P.PolicyError) as e:
        P.validate(doc)
    assert e.value.errors == [
        ("fusion.groups[1].members", "v_proj is already in fusion.groups[0] (a layer joins one group)")
    ]
    for bad in (
        {"scope": "model.layers.*.mlp", "members": ["gate_proj"]},
        {"scope": "model..mlp", "members": ["a", "b"]},
        {"scope": "m", "members": ["a b", "c"]},
        {"scope": "m", "members": ["a", "a"]},
    ):
        doc["fusion"] = {"groups": [bad]}
        with pytest.raises(P.PolicyError):
            P.validate(doc)
    assert P.scopes_overlap("model.layers.*.mlp", "model.layers.7.mlp")
    assert not P.scopes_overlap("model.layers.*.mlp", "model.layers.x.mlp")


def test_a_policy_without_fusion_keeps_its_hash():
    """Adding `fusion` to the schema changed no existing policy: the field is absent, not empty."""
    doc = P.native()
    assert "fusion" not in doc and P.content_hash(doc) == NATIVE_HASH
