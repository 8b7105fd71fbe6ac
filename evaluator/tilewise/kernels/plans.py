"""Kernel plans: which parameter sets are valid, and the search space the daemon's evolution walks.

A `kernel` plan (schema/policy.schema.json, `$defs.plan`, kind "kernel") names a kernel family and its
tile parameters. The schema fixes each parameter's allowed values; this module adds the limits that
depend on the hardware and on the dtype (threads per block, shared memory, tensor-core fragment
shapes, register budget), so a plan that the schema accepts but no kernel can run is refused with a
reason before anything is compiled. docs/kernels.md states the same rules for the Rust side.

Parameters (every value a power of two, so the evolution's aligned step is "x2 or /2 on one axis"):

  gemv  rows_per_block R   output rows per block; one warp (CUDA) / simdgroup (Metal) per row
        split_k S          warps cooperating on one row, each taking every S-th K chunk; their partial
                           sums meet in shared memory (no extra launch)
        vector_width V     elements each lane loads per step (V x itemsize bytes)
  gemm  block_m, block_n   output tile per block
        block_k            K step staged through shared memory per iteration
        warps              warps per block; they tile the output as WARPS_M x WARPS_N
        vector_width V     elements per global load when staging tiles
        split_k S          K range split across S blocks (grid z); float partial sums are added by one
                           MLX reduction afterwards
"""

from __future__ import annotations

import itertools

# Largest M a GEMV kernel plan may serve; equal to policy.GEMV_MAX_M and Rust's GEMV_MAX_M.
GEMV_MAX_M = 16
BACKENDS = ("cuda", "metal")
FAMILIES = ("gemv", "gemm")
DTYPES = ("bfloat16", "float16", "float32")
ITEMSIZE = {"bfloat16": 2, "float16": 2, "float32": 4}

# The schema's enums (kept equal to schema/policy.schema.json; tests/test_kernels.py checks it).
ROWS_PER_BLOCK = (1, 2, 4, 8, 16, 32)
BLOCK_M = (16, 32, 64, 128)
BLOCK_N = (16, 32, 64, 128, 256)
BLOCK_K = (8, 16, 32, 64)
WARPS = (1, 2, 4, 8)
VECTOR_WIDTH = (1, 2, 4, 8)
SPLIT_K = (1, 2, 4, 8)

SIMD_WIDTH = 32  # CUDA warp and Apple simdgroup alike
MAX_THREADS = 1024  # per block on both CUDA (sm_90) and Apple GPUs
SHARED_LIMIT = 48 * 1024  # static shared / threadgroup memory without opt-in (CUDA), and Apple's 32 KB is
METAL_SHARED_LIMIT = 32 * 1024  # the tighter one on Metal
FRAGMENT = 16  # CUDA tensor-core (WMMA) fragment edge for 16-bit inputs: m16n16k16
MAX_FRAGMENTS_PER_WARP = 8  # accumulator fragments per warp: 8 x 8 floats = 64 registers per lane
MAX_OUTPUTS_PER_THREAD = 64  # SIMT paths (fp32 on CUDA, all of Metal): accumulators per thread
GEMM_SMEM_PAD = {"tensor": 8, "simt": 1}  # elements added to each staged row against bank conflicts


def uses_tensor_cores(backend: str, dtype: str) -> bool:
    """CUDA 16-bit GEMMs run on WMMA tensor cores; fp32 (no TF32 rounding wanted) and Metal use SIMT."""
    return backend == "cuda" and ITEMSIZE[dtype] == 2


def warp_grid(block_m: int, block_n: int, warps: int, fragment: int):
    """How `warps` warps tile a block_m x block_n output: (warps_m, warps_n), or None if they cannot.

    Prefers spreading warps along N (each warp then reuses its A fragments across more B fragments);
    each warp's sub-tile must be a whole number of `fragment`-edged squares.
    """
    best = None
    for warps_n in (w for w in WARPS + (16,) if w <= warps and warps % w == 0):
        warps_m = warps // warps_n
        if block_m % (fragment * warps_m) or block_n % (fragment * warps_n):
            continue
        best = (warps_m, warps_n)  # ascending warps_n: the last valid one has the most along N
    return best


def gemm_geometry(plan: dict, backend: str, dtype: str) -> dict:
    """Derived compile-time constants of a GEMM plan (shared by validation and source generation)."""
    bm, bn, bk, warps = plan["block_m"], plan["block_n"], plan["block_k"], plan["warps"]
    threads = SIMD_WIDTH * warps
    tensor = uses_tensor_cores(backend, dtype)
    pad = GEMM_SMEM_PAD["tensor" if tensor else "simt"]
    geo = {"threads": threads, "tensor": tensor, "pad": pad, "lds": bk + pad}
    smem = (bm + bn) * (bk + pad) * ITEMSIZE[dtype]
    if tensor:
        grid = warp_grid(bm, bn, warps, FRAGMENT)
        geo["warps_m"], geo["warps_n"] = grid if grid else (None, None)
        if grid:
            geo["frag_m"] = bm // (FRAGMENT * grid[0])
            geo["frag_n"] = bn // (FRAGMENT * grid[1])
        smem += warps * FRAGMENT * FRAGMENT * 4  # one float 16x16 staging tile per warp (epilogue)
    else:
        geo["per_thread"] = (bm * bn) // threads if (bm * bn) % threads == 0 else None
        # SIMT register tile: thread owns TM rows x TN columns of the block's output.
        geo["thread_cols"] = min(bn, threads)
        geo["thread_rows"] = threads // geo["thread_cols"]
    geo["smem_bytes"] = smem
    return geo


def plan_problems(plan: dict, backend: str | None = None, dtype: str = "bfloat16", m: int | None = None):
    """Every reason `plan` cannot run as a kernel (empty list = runnable).

    `backend` is the machine's backend ("cuda", "metal", "cpu"); None skips that check. `m` (rows of
    the matmul) is checked against the GEMV limit when given. Messages name the field, like policy.py.
    """
    out = []
    if not isinstance(plan, dict) or plan.get("kind") != "kernel":
        return ["not a kernel plan"]
    kb, fam = plan.get("backend"), plan.get("family")
    if kb not in BACKENDS:
        out.append(f"backend: {kb!r} is not one of {BACKENDS}")
    if fam not in FAMILIES:
        out.append(f"family: {fam!r} is not one of {FAMILIES}")
        return out
    if backend is not None and kb in BACKENDS and kb != backend:
        out.append(f"backend: kernel backend {kb} not available on {backend}")
    if dtype not in DTYPES:
        out.append(f"dtype: {dtype!r} is not one of {DTYPES}")
        return out
    vw, sk = plan.get("vector_width"), plan.get("split_k")
    if vw not in VECTOR_WIDTH:
        out.append(f"vector_width: {vw!r} is not one of {VECTOR_WIDTH}")
    if sk not in SPLIT_K:
        out.append(f"split_k: {sk!r} is not one of {SPLIT_K}")
    if out:
        return out
    if fam == "gemv":
        r = plan.get("rows_per_block")
        if r not in ROWS_PER_BLOCK:
            return out + [f"rows_per_block: gemv needs rows_per_block in {ROWS_PER_BLOCK}, got {r!r}"]
        if SIMD_WIDTH * r * sk > MAX_THREADS:
            out.append(f"rows_per_block x split_k: {r} x {sk} warps = {SIMD_WIDTH * r * sk} threads > {MAX_THREADS}")
        if m is not None and m > GEMV_MAX_M:
            out.append(f"family: gemv serves only M <= {GEMV_MAX_M}, got M = {m}")
        return out
    # gemm
    for name, allowed in (("block_m", BLOCK_M), ("block_n", BLOCK_N), ("block_k", BLOCK_K), ("warps", WARPS)):
        if plan.get(name) not in allowed:
            out.append(f"{name}: gemm needs {name} in {allowed}, got {plan.get(name)!r}")
    if out:
        return out
    geo = gemm_geometry(plan, kb, dtype)
    bm, bn, bk = plan["block_m"], plan["block_n"], plan["block_k"]
    if bk % vw:
        out.append(f"vector_width: block_k {bk} is not a multiple of vector_width {vw}")
    limit = SHARED_LIMIT if kb == "cuda" else METAL_SHARED_LIMIT
    if geo["smem_bytes"] > limit:
        out.append(f"block_m/block_n/block_k: {geo['smem_bytes']} bytes of shared memory > {limit}")
    if geo["tensor"]:
        if bk % FRAGMENT:
            out.append(f"block_k: tensor-core path needs a multiple of {FRAGMENT}, got {bk}")
        if geo["warps_m"] is None:
            out.append(f"warps: {plan['warps']} warps cannot tile {bm}x{bn} in {FRAGMENT}x{FRAGMENT} fragments")
        elif geo["frag_m"] * geo["frag_n"] > MAX_FRAGMENTS_PER_WARP:
            out.append(
                f"block_m/block_n: {geo['frag_m'] * geo['frag_n']} fragments per warp > {MAX_FRAGMENTS_PER_WARP}"
            )
    else:
        if geo["per_thread"] is None or bn % geo["thread_cols"] or bm % geo["thread_rows"]:
            out.append(f"warps: {geo['threads']} threads do not evenly tile {bm}x{bn}")
        elif geo["per_thread"] > MAX_OUTPUTS_PER_THREAD:
            out.append(f"block_m/block_n: {geo['per_thread']} outputs per thread > {MAX_OUTPUTS_PER_THREAD}")
    return out


def _gemv_plans(backend, dtype, k):
    out = []
    for r, s, v in itertools.product(ROWS_PER_BLOCK, SPLIT_K, VECTOR_WIDTH):
        # Only vector widths that fill at most 16 bytes and at least 4: narrower loads never win on
        # a memory-bound GEMV, and the space stays small enough to search.
        if not 4 <= v * ITEMSIZE[dtype] <= 16:
            continue
        # Do not split K finer than one vector step per lane per warp.
        if s > 1 and k < SIMD_WIDTH * v * s:
            continue
        out.append(
            {
                "kind": "kernel",
                "backend": backend,
                "family": "gemv",
                "rows_per_block": r,
                "vector_width": v,
                "split_k": s,
            }
        )
    return out


def _gemm_plans(backend, dtype, m, n, k):
    out = []
    v = 16 // ITEMSIZE[dtype]  # GEMM staging loads are always 16 bytes wide
    for bm, bn, bk, w, s in itertools.product(BLOCK_M, BLOCK_N, BLOCK_K, WARPS, SPLIT_K):
        if bm > 2 * max(m, 16) or bn > 2 * max(n, 16):
            continue  # a tile more than twice the problem only adds masked work
        if s > 1 and k // s < bk:
            continue
        out.append(
            {
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
        )
    return out


def kernel_space(backend: str, m: int, n: int, k: int, dtype: str = "bfloat16") -> list[dict]:
    """Every valid kernel plan for one (M, N, K, dtype) on `backend`, in a deterministic order.

    GEMV plans appear only for M <= 16; GEMM plans for every M. The evolution mutates within this
    list (one parameter x2 or /2, then keep it only if it is still in the list).
    """
    if backend not in BACKENDS:
        return []
    plans = _gemv_plans(backend, dtype, k) if m <= GEMV_MAX_M else []
    plans += _gemm_plans(backend, dtype, m, n, k)
    return [p for p in plans if not plan_problems(p, backend, dtype, m)]


KEY_FIELDS = (
    "backend",
    "family",
    "rows_per_block",
    "block_m",
    "block_n",
    "block_k",
    "warps",
    "vector_width",
    "split_k",
)


def plan_key(plan: dict) -> tuple:
    """A hashable identity of a kernel plan's parameters (the compile cache and the shape memo key)."""
    return tuple(plan.get(f) for f in KEY_FIELDS)


def describe(plan: dict) -> str:
    """Short human label: `gemv r4 s2 v8` / `gemm 64x128x32 w4 v8 s1`."""
    if plan.get("family") == "gemv":
        return f"gemv r{plan['rows_per_block']} s{plan['split_k']} v{plan['vector_width']}"
    return (
        f"gemm {plan['block_m']}x{plan['block_n']}x{plan['block_k']} w{plan['warps']} "
        f"v{plan['vector_width']} s{plan['split_k']}"
    )
