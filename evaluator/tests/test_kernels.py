"""Kernel plans on CPU: schema agreement, validation, the search space, plan selection in a policy,
refusal on a backend without the kernel, and well-formed CUDA/Metal launches. (The kernels themselves
run in test_kernels_gpu.py, on the GPU.)"""

import json
import re
from pathlib import Path

import mlx.core as mx
import pytest

from tilewise import policy
from tilewise.kernels import (
    GEMV_MAX_M,
    KernelPlanError,
    KernelUnavailable,
    cuda_source,
    describe,
    kernel_matmul,
    kernel_space,
    kernel_supported,
    machine_backend,
    metal_source,
    plan_launch,
    plan_problems,
    plans,
)

SCHEMA = json.loads((Path(__file__).resolve().parents[2] / "schema" / "policy.schema.json").read_text())
QWEN = [(896, 896), (128, 896), (4864, 896), (896, 4864), (151936, 896)]


def kernel_schema():
    (branch,) = [b for b in SCHEMA["$defs"]["plan"]["oneOf"] if b["properties"]["kind"].get("const") == "kernel"]
    return branch


def gemv(r=4, s=1, v=8, backend="cuda"):
    return {
        "kind": "kernel",
        "backend": backend,
        "family": "gemv",
        "rows_per_block": r,
        "split_k": s,
        "vector_width": v,
    }


def gemm(bm=64, bn=64, bk=32, w=4, v=8, s=1, backend="cuda"):
    return {
        "kind": "kernel",
        "backend": backend,
        "family": "gemm",
        "block_m": bm,
        "block_n": bn,
        "block_k": bk,
        "warps": w,
        "vector_width": v,
        "split_k": s,
    }


def test_parameter_values_are_the_schemas():
    props = kernel_schema()["properties"]
    for name, values in [
        ("rows_per_block", plans.ROWS_PER_BLOCK),
        ("block_m", plans.BLOCK_M),
        ("block_n", plans.BLOCK_N),
        ("block_k", plans.BLOCK_K),
        ("warps", plans.WARPS),
        ("vector_width", plans.VECTOR_WIDTH),
        ("split_k", plans.SPLIT_K),
    ]:
        assert tuple(props[name]["enum"]) == values, name
    assert tuple(props["backend"]["enum"]) == plans.BACKENDS
    assert tuple(props["family"]["enum"]) == plans.FAMILIES
    assert plans.GEMV_MAX_M == policy.GEMV_MAX_M == 16


@pytest.mark.parametrize("backend", ["cuda", "metal"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("m", [1, 16, 17, 2048])
def test_space_is_valid_aligned_and_respects_the_gemv_limit(backend, dtype, m):
    n, k = 896, 4864
    space = kernel_space(backend, m, n, k, dtype)
    assert len(space) > 50
    assert space == kernel_space(backend, m, n, k, dtype)  # deterministic
    assert len({json.dumps(p, sort_keys=True) for p in space}) == len(space)  # no duplicates
    families = {p["family"] for p in space}
    assert families == ({"gemv", "gemm"} if m <= GEMV_MAX_M else {"gemm"})
    for p in space:
        assert p["backend"] == backend
        assert plan_problems(p, backend, dtype, m) == []
        for key, v in p.items():
            if isinstance(v, int):
                assert v & (v - 1) == 0, (key, v)  # powers of two: the evolution steps x2 or /2
    # Every plan is a valid policy plan, in a rule whose M range allows its family.
    rules = [{"m": [1, min(m, GEMV_MAX_M)] if p["family"] == "gemv" else [1, None], "plan": p} for p in space[:256]]
    doc = policy.make_policy(rules, target={"device": "d", "model": "m", "mlx": "0.32.4", "backend": backend})
    policy.validate_for_backend(doc, backend)


def test_no_space_for_a_backend_without_kernels():
    assert kernel_space("cpu", 1, 896, 896) == []


@pytest.mark.parametrize(
    "plan,dtype,m,expect",
    [
        (gemv(r=32, s=2), "bfloat16", 1, "threads"),
        (gemv(), "bfloat16", 17, "M <= 16"),
        (gemv(r=3), "bfloat16", 1, "rows_per_block"),
        (gemm(bk=8), "bfloat16", 64, "multiple of 16"),  # tensor cores need k steps of 16
        (gemm(bm=128, bn=256, bk=64, w=8), "bfloat16", 64, "shared memory"),
        (gemm(bm=128, bn=128, w=1), "bfloat16", 64, "fragments per warp"),
        (gemm(bm=16, bn=16, w=8), "bfloat16", 64, "cannot tile"),
        (gemm(bm=128, bn=128, w=1, v=4), "float32", 64, "outputs per thread"),
        (gemm(bk=16, v=32), "bfloat16", 64, "vector_width"),
        ({**gemm(), "block_m": None}, "bfloat16", 64, "block_m"),
        (gemm(), "int8", 64, "dtype"),
        ({"kind": "split"}, "bfloat16", 64, "not a kernel plan"),
    ],
)
def test_plans_no_kernel_can_run_are_refused_with_the_field(plan, dtype, m, expect):
    problems = plan_problems(plan, "cuda", dtype, m)
    assert problems and any(expect in p for p in problems), problems
    if plan.get("kind") == "kernel" and dtype in plans.DTYPES:
        with pytest.raises(KernelPlanError, match=re.escape(expect)):
            plan_launch(plan, m, 896, 896, dtype)


def test_same_parameters_valid_for_fp32_simt_but_not_tensor_cores():
    p = gemm(bk=8, v=4)
    assert plan_problems(p, "cuda", "float32", 64) == []
    assert plan_problems(p, "cuda", "bfloat16", 64)


def test_plan_for_another_backend_is_refused():
    assert kernel_supported(gemv(), "cuda") == (True, "")
    assert kernel_supported(gemv(backend="metal"), "metal") == (True, "")
    for plan, machine in [(gemv(), "metal"), (gemv(), "cpu"), (gemm(backend="metal"), "cuda")]:
        ok, why = kernel_supported(plan, machine)
        assert not ok and f"kernel backend {plan['backend']} not available on {machine}" == why
    ok, why = kernel_supported(gemm(bk=8), "cuda")
    assert not ok and "block_k" in why


def test_kernel_matmul_refuses_a_plan_for_a_backend_this_machine_lacks():
    # Real MLX on whatever this machine runs (CPU here; CUDA on the GPU machine): a plan for a backend
    # the machine does not have raises instead of running.
    here = machine_backend()
    other = "metal" if here == "cuda" else "cuda"
    x, w = mx.ones((2, 64)), mx.ones((32, 64))
    with pytest.raises(KernelUnavailable, match=f"kernel backend {other} not available on {here}"):
        kernel_matmul(x, w, gemv(backend=other))
    with pytest.raises(KernelPlanError, match="shapes do not multiply"):
        kernel_matmul(x, mx.ones((32, 63)), gemv(backend=here if here != "cpu" else "cuda"))


def test_plan_selection_in_a_policy_and_refusal_by_backend():
    decode, prefill = gemv(r=8, s=2), gemm(bm=128, bn=64, bk=32, w=4)
    doc = policy.make_policy(
        [
            {"m": [1, 16], "n": [896, 896], "k": [4864, 4864], "plan": decode},
            {"m": [128, None], "n": [4864, 4864], "plan": prefill},
        ],
        target={"device": "h100", "model": "qwen", "mlx": "0.32.4", "backend": "cuda"},
    )
    assert policy.plan_for(doc, 1, 896, 4864) == decode
    assert policy.plan_for(doc, 16, 896, 4864) == decode
    assert policy.plan_for(doc, 17, 896, 4864) == {"kind": "native"}
    assert policy.plan_for(doc, 2048, 4864, 896) == prefill
    assert policy.plan_for(doc, 1, 896, 896) == {"kind": "native"}
    policy.validate_for_backend(doc, "cuda")
    with pytest.raises(policy.PolicyError, match="not available on metal"):
        policy.validate_for_backend(doc, "metal")
    with pytest.raises(policy.PolicyError, match="gemv serves only"):
        policy.make_policy([{"m": [1, 64], "plan": decode}])


def _sampled_launches(backend):
    for n, k in QWEN + [(129, 37)]:
        for m in (1, 7, 16, 130, 2048):
            for dtype in ("bfloat16", "float16", "float32"):
                space = kernel_space(backend, m, n, k, dtype)
                for p in space[:: max(1, len(space) // 25)]:
                    yield p, m, n, k, dtype


IDENT = re.compile(r"\b[A-Z][A-Z0-9_]*\b")
# Upper-case names a body may use that are not template arguments.
BODY_CONSTANTS = {"THREADS", "TM", "TN", "KV", "N", "K", "M", "TW_BIAS"}


@pytest.mark.parametrize("backend", ["cuda", "metal"])
def test_every_launch_is_well_formed(backend):
    count = 0
    for i, (plan, m, n, k, dtype) in enumerate(_sampled_launches(backend)):
        launch = plan_launch(plan, m, n, k, dtype, bias=i % 2 == 1)
        count += 1
        assert "#define TW_BIAS(col)" in launch.declarations
        assert ("bias[col]" in launch.declarations) == launch.bias == ("bias" in launch.input_names)
        src = launch.body_source
        assert launch.source.startswith(launch.declarations) and re.fullmatch(r"\w+", launch.kernel_name)
        names = [name for name, _ in launch.params]
        assert len(set(names)) == len(names)
        # Every template argument is used, and every upper-case constant the body uses is defined.
        for name in names:
            assert re.search(rf"\b{name}\b", src), (launch.body, name)
        assert set(IDENT.findall(src)) - set(names) - BODY_CONSTANTS == set(), launch.body
        assert src.count("{") == src.count("}") and src.count("(") == src.count(")")
        # Geometry: whole threadgroups, enough of them to cover every output, within hardware limits.
        gx, gy, gz = launch.grid
        tx, ty, tz = launch.threadgroup
        assert gx % tx == 0 and (ty, tz) == (1, 1) and tx * ty * tz <= plans.MAX_THREADS and tx % 32 == 0
        if plan["family"] == "gemv":
            assert (gx // tx) * plan["rows_per_block"] >= n and launch.out_shape == (m, n)
        else:
            assert (gx // tx) * plan["block_n"] >= n and gy * plan["block_m"] >= m and gz == plan["split_k"]
            assert launch.out_shape == ((m, n) if plan["split_k"] == 1 else (plan["split_k"], m, n))
            assert launch.out_dtype == (dtype if plan["split_k"] == 1 else "float32")
        # Each backend's body uses only its own barriers and intrinsics.
        if backend == "cuda":
            assert "threadgroup_barrier" not in src and "simd_sum" not in src
            assert launch.body == (
                "gemv" if plan["family"] == "gemv" else "gemm_tc" if dtype != "float32" else "gemm_simt"
            )
        else:
            assert "__syncthreads" not in src and "__shfl" not in src and "wmma" not in src
            assert launch.body in metal_source.SOURCES
    assert count > 100


def test_leading_dims_bias_and_names():
    plan = gemm(s=2)
    a = plan_launch(plan, 18, 96, 160, "bfloat16", lead=(2, 9), bias=True)
    assert a.out_shape == (2, 2, 9, 96) and a.reduce_splits and ("XND", 3) in a.params
    assert "blockIdx.z == 0" in a.declarations  # split-K partials carry the bias once
    b = plan_launch(plan, 18, 96, 160, "bfloat16", lead=(18,))
    assert b.out_shape == (2, 18, 96) and ("XND", 2) in b.params and not b.bias
    assert len({a.kernel_name, b.kernel_name, plan_launch(gemm(s=1), 18, 96, 160, "bfloat16").kernel_name}) == 3
    with pytest.raises(KernelPlanError, match="leading dims"):
        plan_launch(plan, 18, 96, 160, "bfloat16", lead=(2, 8))


def test_cuda_header_defines_what_bodies_call():
    for body in cuda_source.SOURCES.values():
        declared_in_body = set(re.findall(r"\b(tw_\w+)\[", body)) & set(re.findall(r"float (tw_\w+)\[", body))
        for name in set(re.findall(r"\b(tw_\w+)\b", body)) - declared_in_body:
            assert re.search(rf"\b{name}\b", cuda_source.HEADER), name


def test_describe_is_short_and_distinct():
    labels = {describe(p) for p in kernel_space("cuda", 1, 896, 896)}
    assert len(labels) == len(kernel_space("cuda", 1, 896, 896))
