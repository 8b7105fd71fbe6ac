"""The Metal kernel bodies RUN here, on the CPU, through tilewise.kernels.metal_emu (a C++20 emulation
of the MSL subset they use, wrapped exactly as MLX's `metal_kernel` wraps a body; see its docstring).

Sample (deterministic; ~130 kernels, each compiled in ~0.15 s against the once-compiled runtime and
cached by source hash: under a minute cold on 2 cores, ~15 s warm):
- problems with remainders everywhere: (M, N, K) = (1, 37, 300), (3, 45, 77), (16, 50, 129) as x of
  shape (2, 8, K), (33, 70, 100) as x of shape (3, 11, K): K not a multiple of any vector width,
  N not a multiple of any tile, M in {1, 3, 16, 33};
- each in bfloat16, float16 and float32; from `kernel_space('metal', M, N, K, dtype)` three GEMV
  plans (one with split_k > 1 where the space has one) at M <= 16 and six GEMM plans (two with
  split_k > 1, one with 8 simdgroups, one with 1, two at random); bias on for every other case;
- tiny problems where MLX passes x or w in the `constant` address space (fewer than 8 elements):
  the case that found the GEMV's `const device T*` row pointer (a Metal compile error).

TILEWISE_METAL_EMU_ALL=1 runs every plan of those four problems' spaces instead (4,313 launches,
several minutes; not the default).

Each run: random inputs, output pre-filled with NaN (as `kernel_matmul_checked`), split-K partials
summed in float32 and rounded once (as matmul.py does), compared with a float64 reference within the
output dtype's rounding (half an ulp: 2^-8 bf16, 2^-11 fp16, 2^-24 fp32, relative) plus float32
accumulation error. The emulator itself fails a run that races (three thread orders must agree bit
for bit), deadlocks at a barrier or simd_sum, or touches memory outside its buffers; the mutation
tests at the end show each of those checks firing on a deliberately broken body.
"""

import os
import random
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from tilewise.kernels import kernel_space, metal_source, plan_launch
from tilewise.kernels import metal_emu as emu

EPS_OUT = {"bfloat16": 2.0**-8, "float16": 2.0**-11, "float32": 2.0**-24}
PROBLEMS = ((1, 37, 300, (1,)), (3, 45, 77, (3,)), (16, 50, 129, (2, 8)), (33, 70, 100, (3, 11)))
TINY = ((1, 1, 5, (1,)), (1, 7, 1, (1,)), (2, 3, 2, (2,)))
DTYPES = ("bfloat16", "float16", "float32")


def _pick(space, rng):
    """3 GEMV plans (the first with split_k > 1 where there is one) and 6 GEMM plans (two with
    split_k > 1, one with 8 simdgroups, one with 1, two at random), without repeats."""
    out = []

    def take(pool, k=1):
        for _ in range(k):
            left = [p for p in pool if p not in out]
            if left:
                out.append(rng.choice(left))

    gemv = [p for p in space if p["family"] == "gemv"]
    gemm = [p for p in space if p["family"] == "gemm"]
    take([p for p in gemv if p["split_k"] > 1] or gemv)
    take(gemv, 2)
    take([p for p in gemm if p["split_k"] > 1], 2)
    take([p for p in gemm if p["warps"] == 8])
    take([p for p in gemm if p["warps"] == 1])
    take(gemm, 2)
    return out


def _cases():
    cases = []
    for m, n, k, lead in PROBLEMS:
        for dtype in DTYPES:
            rng = random.Random(f"{m}-{n}-{k}-{dtype}")
            space = kernel_space("metal", m, n, k, dtype)
            for plan in space if os.environ.get("TILEWISE_METAL_EMU_ALL") else _pick(space, rng):
                cases.append((plan, m, n, k, lead, dtype, len(cases) % 2 == 1))
    for m, n, k, lead in TINY:
        for dtype in ("bfloat16", "float32"):
            space = kernel_space("metal", m, n, k, dtype)
            for plan in (space[0], [p for p in space if p["family"] == "gemm"][0]):
                for bias in (False, True):
                    cases.append((plan, m, n, k, lead, dtype, bias))
    return cases


CASES = _cases()


def _label(case):
    plan, m, n, k, lead, dtype, bias = case
    fam = (
        f"gemv-r{plan['rows_per_block']}s{plan['split_k']}v{plan['vector_width']}"
        if plan["family"] == "gemv"
        else f"gemm-{plan['block_m']}x{plan['block_n']}x{plan['block_k']}w{plan['warps']}s{plan['split_k']}"
    )
    return f"{fam}-{'x'.join(map(str, lead))}x{k}-n{n}-{dtype}{'-bias' if bias else ''}"


def _inputs(case, seed=0):
    plan, m, n, k, lead, dtype, bias = case
    rng = np.random.default_rng(seed)
    arrays = [emu.to_storage(rng.uniform(-1, 1, lead + (k,)), dtype), emu.to_storage(rng.uniform(-1, 1, (n, k)), dtype)]
    if bias:
        arrays.append(emu.to_storage(rng.uniform(-1, 1, (n,)), dtype))
    return plan_launch(plan, m, n, k, dtype, lead=lead, bias=bias), arrays


@pytest.fixture(scope="module")
def compiled():
    """Fails (does not skip) without g++; compiles every case's kernel, two at a time, into the cache."""
    try:
        emu.compiler()
    except emu.CompilerMissing as e:
        pytest.fail(str(e))

    def build(case):
        launch, arrays = _inputs(case)
        try:
            emu.build(emu.launch_translation_unit(launch, [a.shape for a in arrays]))
        except emu.EmulatorError:
            pass  # the case's own test recompiles and reports the error

    with ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1))) as pool:
        list(pool.map(build, CASES))
    return True


def _check(launch, arrays, out, dtype, k):
    y = emu.from_storage(out, launch.out_dtype)
    if launch.reduce_splits:  # matmul.py: partials.sum(axis=0).astype(dtype), in float32
        y = emu.from_storage(emu.to_storage(y.astype(np.float32).sum(axis=0, dtype=np.float32), dtype), dtype)
    x, w = emu.from_storage(arrays[0], dtype), emu.from_storage(arrays[1], dtype)
    ref = x @ w.T
    mag = np.abs(x) @ np.abs(w).T
    if len(arrays) == 3:
        b = emu.from_storage(arrays[2], dtype)
        ref, mag = ref + b, mag + np.abs(b)
    tol = EPS_OUT[dtype] * np.abs(ref) + (k + 2) * 2.0**-23 * mag
    assert y.shape == ref.shape
    assert not np.isnan(y).any(), f"{int(np.isnan(y).sum())} output elements never written (NaN)"
    bad = np.abs(y - ref) > tol
    assert not bad.any(), (
        f"{int(bad.sum())} of {y.size} elements off; first at {np.argwhere(bad)[0]}: {y[bad][0]} vs {ref[bad][0]}"
    )


@pytest.mark.parametrize("case", CASES, ids=[_label(c) for c in CASES])
def test_metal_kernel_matches_float64_reference(compiled, case):
    plan, m, n, k, lead, dtype, bias = case
    launch, arrays = _inputs(case, seed=len(_label(case)))
    out = emu.emulate_launch(launch, arrays)
    _check(launch, arrays, out, dtype, k)


def test_sample_covers_the_brief():
    """The sample really holds what the docstring says (a sample can silently shrink when the space changes)."""
    fams = {(c[0]["family"], c[0]["split_k"] > 1) for c in CASES}
    assert fams == {("gemv", False), ("gemv", True), ("gemm", False), ("gemm", True)}
    assert {c[1] for c in CASES} >= {1, 3, 16, 33} and {c[5] for c in CASES} == set(DTYPES)
    assert {c[6] for c in CASES} == {False, True}
    assert any(c[3] * c[2] < emu.MAX_CONSTANT_ARRAY_SIZE and c[0]["family"] == "gemv" for c in CASES)
    for plan, m, n, k, _lead, _dtype, _bias in CASES:
        if plan["family"] == "gemm":
            assert n % plan["block_n"] or k % plan["block_k"] or m % plan["block_m"]
    assert len(CASES) <= 160 or os.environ.get("TILEWISE_METAL_EMU_ALL")  # the time budget (< 3 min cold)


def test_tiny_w_in_constant_address_space_compiles():
    """Regression: the GEMV read w through `const device T* wr = w + ...`; MLX passes w with fewer than 8
    elements as `const constant T*`, and Metal (like the emulation) refuses that conversion."""
    plan = {
        "kind": "kernel",
        "backend": "metal",
        "family": "gemv",
        "rows_per_block": 1,
        "vector_width": 1,
        "split_k": 1,
    }
    launch = plan_launch(plan, 1, 1, 5, "float32")
    tu = emu.launch_translation_unit(launch, [(1, 5), (1, 5)])
    assert "const volatile float* w" not in tu and "const constant float* w" in tu
    old = launch.source.replace("const size_t row = size_t(n) * K;", "const device T* wr = w + size_t(n) * K;")
    old = old.replace("w[row + c + j]", "wr[c + j]")
    assert old != launch.source
    with pytest.raises(emu.EmulatorError, match="invalid conversion"):
        emu.build(emu.launch_translation_unit(launch, [(1, 5), (1, 5)], source=old))
    x, w = emu.to_storage([[1, 2, 3, 4, 5]], "float32"), emu.to_storage([[1, 1, 1, 1, 2]], "float32")
    assert emu.emulate_launch(launch, [x, w]).tolist() == [[20.0]]


def test_conversions_round_like_mlx():
    """The emulated bfloat16_t and half round float -> 16 bits exactly as MLX does (nearest even; NaN,
    infinities, overflow, subnormals), checked by converting through a kernel body and comparing bits."""
    mx = pytest.importorskip("mlx.core")
    vals = np.array(
        [
            0.0,
            -0.0,
            1.0,
            1.00390625,
            1.005859375,
            1.0078125 + 2**-9,
            3.14159265,
            -2.5e-3,
            65504.0,
            65520.0,
            1e5,
            3.4e38,
            1e-8,
            6e-8,
            2**-130,
            float("inf"),
            -float("inf"),
            float("nan"),
            *np.random.default_rng(1).normal(0, 100, 200),
        ],
        dtype=np.float32,
    )
    src = "  uint i = thread_position_in_grid.x;\n  if (i < x_shape[0]) y[i] = static_cast<OutT>(x[i]);\n"
    for dtype, mxd in (("bfloat16", mx.bfloat16), ("float16", mx.float16)):
        body = f"  using OutT = {emu.TYPE_NAMES[dtype]};\n" + src
        out = emu.emulate(
            f"cvt_{dtype}", body, [("x", "float32", vals)], ("y", dtype), vals.shape, (256, 1, 1), (64, 1, 1)
        )
        want = np.array(mx.array(vals).astype(mxd).view(mx.uint16))
        got = out.view(np.uint16)
        nan = np.isnan(vals)
        assert (got[~nan] == want[~nan]).all(), vals[~nan][got[~nan] != want[~nan]]
        assert np.isnan(emu.from_storage(out, dtype)[nan]).all()
        assert (emu.to_storage(vals, dtype).view(np.uint16)[~nan] == want[~nan]).all()  # the test's own rounding


# ---- the emulator has teeth: each deliberately broken body must fail, with the right diagnosis ----


def _case(family, split=1, dtype="float32", m=3, n=45, k=77):
    if family == "gemv":
        plan = {
            "kind": "kernel",
            "backend": "metal",
            "family": "gemv",
            "rows_per_block": 2,
            "vector_width": 2,
            "split_k": split,
        }
    else:
        plan = {
            "kind": "kernel",
            "backend": "metal",
            "family": "gemm",
            "block_m": 16,
            "block_n": 32,
            "block_k": 16,
            "warps": 2,
            "vector_width": 4,
            "split_k": split,
        }
    return _inputs((plan, m, n, k, (m,), dtype, True))


def _mutant(launch, old, new, count=1):
    assert launch.source.count(old) >= count, old
    return launch.source.replace(old, new, count)


def _runs_clean(launch, arrays, source):
    try:
        out = emu.emulate_launch(launch, arrays, source=source)
    except emu.EmulatorError as e:
        return str(e)
    try:
        _check(launch, arrays, out, dict(launch.params)["T"], arrays[0].shape[-1])
    except AssertionError as e:
        return f"wrong result: {e}"
    return None


def test_unmutated_mutation_bases_pass():
    for launch, arrays in (_case("gemm"), _case("gemv", split=2, k=300), _case("gemm", split=2)):
        assert _runs_clean(launch, arrays, launch.source) is None


def test_missing_barrier_after_staging_is_caught():
    launch, arrays = _case("gemm")
    bar = "    threadgroup_barrier(mem_flags::mem_threadgroup);\n    for (int kk"
    why = _runs_clean(launch, arrays, _mutant(launch, bar, "    for (int kk"))
    assert why and ("data race" in why or "wrong result" in why), why


def test_missing_barrier_before_restaging_is_caught():
    launch, arrays = _case("gemm")
    src = _mutant(launch, "    }\n    threadgroup_barrier(mem_flags::mem_threadgroup);\n  }\n", "    }\n  }\n")
    why = _runs_clean(launch, arrays, src)
    assert why and ("data race" in why or "wrong result" in why), why


def test_missing_split_barrier_in_gemv_is_caught():
    launch, arrays = _case("gemv", split=2, k=300)
    why = _runs_clean(launch, arrays, _mutant(launch, "    threadgroup_barrier(mem_flags::mem_threadgroup);\n", ""))
    assert why and ("data race" in why or "wrong result" in why), why


def test_divergent_simd_sum_is_a_deadlock():
    launch, arrays = _case("gemv")
    src = _mutant(launch, "acc[i] = simd_sum(acc[i]);", "if (lane < 16) acc[i] = simd_sum(acc[i]);")
    why = _runs_clean(launch, arrays, src)
    assert why and "deadlock" in why and "simd_sum" in why, why


def test_barrier_skipped_by_early_return_is_a_deadlock():
    launch, arrays = _case("gemm")
    src = _mutant(launch, "  for (int k0 = k_begin;", "  if (tid >= 32) return;\n  for (int k0 = k_begin;")
    why = _runs_clean(launch, arrays, src)
    assert why and "deadlock" in why, why


def test_missing_k_remainder_guard_is_caught():
    launch, arrays = _case("gemv", dtype="float32", m=1, n=45, k=77)
    why = _runs_clean(launch, arrays, _mutant(launch, "if (c + j < K) {", "if (true) {"))
    assert why and ("out-of-bounds" in why or "wrong result" in why), why


def test_overrun_of_last_row_hits_the_guard_page():
    launch, arrays = _case("gemm")
    src = _mutant(launch, "(gr < N && gc < k_end) ? w[size_t(gr) * K + gc]", "(gc < k_end) ? w[size_t(gr) * K + gc]")
    why = _runs_clean(launch, arrays, src)
    assert why and "out-of-bounds" in why, why


def test_unmasked_store_is_caught():
    launch, arrays = _case("gemm")
    why = _runs_clean(launch, arrays, _mutant(launch, "if (gm < M && gn < N) {", "if (gm < M) {"))
    assert why and ("out-of-bounds" in why or "wrong result" in why), why


def test_split_k_bias_on_every_split_is_caught():
    launch, arrays = _case("gemm", split=2)
    assert launch.reduce_splits and "z == 0 ?" in launch.source
    why = _runs_clean(
        launch,
        arrays,
        _mutant(launch, "(z == 0 ? static_cast<float>(bias[col]) : 0.0f)", "static_cast<float>(bias[col])"),
    )
    assert why and "wrong result" in why, why


def test_threadgroup_memory_over_32k_is_refused():
    launch, arrays = _case("gemm")
    src = _mutant(launch, "threadgroup T As[BM * LDS];", "threadgroup float As[BM * LDS * 64];")
    why = _runs_clean(launch, arrays, src)
    assert why and "32 KiB" in why, why


def test_every_metal_body_is_exercised():
    bodies = {plan_launch(c[0], c[1], c[2], c[3], c[5], lead=c[4], bias=c[6]).body for c in CASES}
    assert bodies == set(metal_source.SOURCES)
