"""Kernel plans run on the GPU: correctness for odd shapes, every dtype, both families, split-K, the
VJP. Runs only where MLX has a GPU backend whose kernels this package generates (CUDA here; Metal on a
Mac); on MLX CPU the whole module is skipped, and bench/gpu/run-h100.sh runs it on the H100 (its log
is committed under results/h100/).
"""

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")

from tilewise.kernels import kernel_matmul, kernel_matmul_checked, kernel_space, machine_backend  # noqa: E402

BACKEND = machine_backend()
pytestmark = pytest.mark.skipif(BACKEND not in ("cuda", "metal"), reason=f"no GPU kernel backend ({BACKEND})")

DT = {"bfloat16": mx.bfloat16, "float16": mx.float16, "float32": mx.float32}
# ||out - ref|| / ||ref|| against a float64 reference: output rounding dominates for 16-bit types.
TOL = {"bfloat16": 1e-2, "float16": 2e-3, "float32": 1e-5}


def gemv(r, s, v):
    return {
        "kind": "kernel",
        "backend": BACKEND,
        "family": "gemv",
        "rows_per_block": r,
        "split_k": s,
        "vector_width": v,
    }


def gemm(bm, bn, bk, warps, v, s):
    return {
        "kind": "kernel",
        "backend": BACKEND,
        "family": "gemm",
        "block_m": bm,
        "block_n": bn,
        "block_k": bk,
        "warps": warps,
        "vector_width": v,
        "split_k": s,
    }


def rel_err(out, x, w):
    ref = np.asarray(x.astype(mx.float32)).astype(np.float64) @ np.asarray(w.astype(mx.float32)).astype(np.float64).T
    got = np.asarray(out.astype(mx.float32)).astype(np.float64)
    return float(np.linalg.norm(got - ref) / np.linalg.norm(ref))


def fresh(m, n, k, dtype, seed):
    key = mx.random.key(seed)
    kx, kw = mx.random.split(key)
    x = mx.random.normal((m, k), key=kx).astype(DT[dtype])
    w = (mx.random.normal((n, k), key=kw) / np.sqrt(k)).astype(DT[dtype])
    return x, w


# Odd sizes on purpose: K not a multiple of any vector width, N and M not multiples of any tile.
ODD = [(1, 129, 37), (3, 100, 1000), (16, 257, 999), (5, 896, 4864)]


@pytest.mark.parametrize("dtype", list(DT))
@pytest.mark.parametrize("m,n,k", ODD)
@pytest.mark.parametrize(
    "plan",
    [gemv(1, 1, 8), gemv(4, 2, 4), gemv(16, 1, 2), gemv(2, 8, 8), gemv(8, 4, 1)],
    ids=lambda p: f"r{p['rows_per_block']}s{p['split_k']}v{p['vector_width']}",
)
def test_gemv_correct_on_odd_shapes(plan, m, n, k, dtype):
    x, w = fresh(m, n, k, dtype, seed=m * 7 + n + k)
    out = kernel_matmul_checked(x, w, plan)
    assert out.shape == (m, n) and out.dtype == DT[dtype]
    err = rel_err(out, x, w)
    assert err < TOL[dtype], err


GEMMS = [
    gemm(16, 16, 16, 1, 8, 1),
    gemm(64, 64, 32, 4, 8, 1),
    gemm(128, 128, 32, 8, 8, 1),
    gemm(32, 64, 64, 2, 4, 2),
    gemm(64, 128, 32, 4, 8, 4),
    gemm(128, 64, 16, 8, 2, 8),
]


@pytest.mark.parametrize("dtype", list(DT))
@pytest.mark.parametrize("m,n,k", [(17, 129, 37), (130, 77, 999), (257, 300, 520), (64, 896, 896), (33, 4864, 136)])
@pytest.mark.parametrize(
    "plan",
    GEMMS,
    ids=lambda p: f"{p['block_m']}x{p['block_n']}x{p['block_k']}w{p['warps']}v{p['vector_width']}s{p['split_k']}",
)
def test_gemm_correct_on_odd_shapes(plan, m, n, k, dtype):
    from tilewise.kernels import plan_problems

    if plan_problems(plan, BACKEND, dtype, m):
        pytest.skip("plan not valid for this dtype: " + "; ".join(plan_problems(plan, BACKEND, dtype, m)))
    x, w = fresh(m, n, k, dtype, seed=m + n * 3 + k)
    out = kernel_matmul_checked(x, w, plan)
    assert out.shape == (m, n) and out.dtype == DT[dtype]
    err = rel_err(out, x, w)
    assert err < TOL[dtype], err


def test_plans_across_the_space_are_correct_for_a_decode_and_a_prefill_shape():
    # Parameter sets spread evenly over the space the evolution walks (every plan would be ~1000
    # compiles) compile and compute the right thing.
    for m, n, k in [(4, 136, 264), (96, 136, 264)]:
        x, w = fresh(m, n, k, "bfloat16", seed=m)
        space = kernel_space(BACKEND, m, n, k, "bfloat16")
        for plan in space[:: max(1, len(space) // 40)]:
            err = rel_err(kernel_matmul_checked(x, w, plan), x, w)
            assert err < TOL["bfloat16"], (plan, err)


@pytest.mark.parametrize(
    "plan", [gemm(16, 32, 16, 2, 4, 2), gemm(32, 32, 16, 4, 4, 1), gemv(2, 2, 4)], ids=["gemm-split2", "gemm", "gemv"]
)
@pytest.mark.parametrize("lead", [(2, 7), (1, 1, 5)])
def test_leading_dims_bias_and_gradients_match_native(plan, lead):
    m = int(np.prod(lead))
    x, w = fresh(m, 96, 160, "float32", seed=3)
    x = x.reshape(*lead, 160)
    b = mx.random.normal((96,))
    out = kernel_matmul(x, w, plan, bias=b)
    assert out.shape == (*lead, 96)
    # Against float64 (MLX's own fp32 matmul on CUDA runs on TF32 tensor cores, ~1e-3 off; the SIMT
    # fp32 kernel is exact to float32 rounding).
    ref = np.asarray(x).astype(np.float64) @ np.asarray(w).astype(np.float64).T
    np.testing.assert_allclose(np.asarray(out), ref + np.asarray(b), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(kernel_matmul(x, w, plan)), ref, rtol=1e-5, atol=1e-5)
    r = mx.random.normal((*lead, 96))

    def loss(fn, x, w, b):
        return (fn(x, w, b) * r).sum()

    grad = lambda fn: mx.grad(lambda x, w, b: loss(fn, x, w, b), argnums=(0, 1, 2))(x, w, b)  # noqa: E731
    gk = grad(lambda a, c, d: kernel_matmul(a, c, plan, bias=d))
    gn = grad(lambda a, c, d: a @ c.T + d)
    # The backward is native matmuls on both sides: the same ops on the same cotangent.
    for a, c in zip(gk, gn):
        np.testing.assert_allclose(np.asarray(a), np.asarray(c), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_bias_in_16_bit_with_split_k(dtype):
    x, w = fresh(300, 200, 520, dtype, seed=5)
    b = mx.random.normal((200,)).astype(DT[dtype])
    out = kernel_matmul_checked(x, w, gemm(64, 64, 32, 4, 8, 4), bias=b)
    ref = np.asarray(x.astype(mx.float32)) @ np.asarray(w.astype(mx.float32)).T + np.asarray(b.astype(mx.float32))
    err = np.linalg.norm(np.asarray(out.astype(mx.float32)) - ref) / np.linalg.norm(ref)
    assert err < TOL[dtype], err


def test_the_correctness_check_can_fail():
    # The same measure that passes the kernel rejects a result of slightly different weights.
    x, w = fresh(4, 200, 300, "bfloat16", seed=11)
    out = kernel_matmul_checked(x, w, gemv(4, 1, 8))
    assert rel_err(out, x, w) < TOL["bfloat16"]
    assert rel_err(out, x, w * 1.01 + 0.05) > TOL["bfloat16"]
