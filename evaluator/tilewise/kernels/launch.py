"""From a kernel plan and a problem (M, N, K, dtype) to one launch: which body, its template arguments,
grid, threadgroup and output. Pure Python (no MLX calls), so the CPU tests can check every launch the
search space can produce; `matmul.py` turns a `Launch` into an `mx.fast.*_kernel` call.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from . import cuda_source, metal_source
from .plans import SIMD_WIDTH, gemm_geometry, plan_problems


class KernelPlanError(ValueError):
    """A kernel plan that cannot run for this problem (the reason names the field)."""


@dataclass(frozen=True)
class Launch:
    backend: str  # "cuda" | "metal"
    body: str  # key into cuda_source.SOURCES / metal_source.SOURCES
    template: tuple = field(default=())  # ((name, int | dtype-name), ...) in declaration order
    grid: tuple = (1, 1, 1)  # threads, as MLX counts them
    threadgroup: tuple = (1, 1, 1)
    out_shape: tuple = ()
    out_dtype: str = "bfloat16"  # "float32" for split-K partials
    reduce_splits: bool = False  # out is (split_k, M, N) partials: sum axis 0 and cast afterwards

    @property
    def source(self) -> str:
        return (cuda_source.SOURCES if self.backend == "cuda" else metal_source.SOURCES)[self.body]

    @property
    def kernel_name(self) -> str:
        """Stable per body: MLX appends the template-argument hash, so each parameter set gets its own
        compiled module under this name."""
        return f"tilewise_{self.body}"


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def plan_launch(plan: dict, m: int, n: int, k: int, dtype: str) -> Launch:
    """The launch for `x (m, k) @ w (n, k).T` under `plan`; raises KernelPlanError if it cannot run."""
    backend = plan.get("backend")
    problems = plan_problems(plan, None, dtype, m)
    if problems:
        raise KernelPlanError("; ".join(problems))
    if min(m, n, k) < 1:
        raise KernelPlanError(f"empty problem: M={m}, N={n}, K={k}")
    vw, sk = plan["vector_width"], plan["split_k"]
    if plan["family"] == "gemv":
        r = plan["rows_per_block"]
        threads = SIMD_WIDTH * r * sk
        blocks = _ceil_div(n, r)
        return Launch(
            backend=backend,
            body="gemv",
            template=(("T", dtype), ("MR", m), ("R", r), ("S", sk), ("V", vw)),
            grid=(blocks * threads, 1, 1),
            threadgroup=(threads, 1, 1),
            out_shape=(m, n),
            out_dtype=dtype,
        )
    geo = gemm_geometry(plan, backend, dtype)
    bm, bn, bk, warps = plan["block_m"], plan["block_n"], plan["block_k"], plan["warps"]
    threads = geo["threads"]
    common = (("BM", bm), ("BN", bn), ("BK", bk), ("WARPS", warps), ("V", vw), ("SPLIT", sk), ("LDS", geo["lds"]))
    if geo["tensor"]:
        body = "gemm_tc"
        extra = (("WN", geo["warps_n"]), ("FM", geo["frag_m"]), ("FN", geo["frag_n"]))
    else:
        body = "gemm_simt"
        extra = (("TROWS", geo["thread_rows"]), ("TCOLS", geo["thread_cols"]))
    out_dtype = dtype if sk == 1 else "float32"
    types = (("T", dtype),)
    if backend == "metal":
        types += (("OutT", out_dtype),)
        common = tuple(kv for kv in common if kv[0] != "V")  # Metal stages element-wise
    return Launch(
        backend=backend,
        body=body,
        template=types + common + extra,
        grid=(_ceil_div(n, bn) * threads, _ceil_div(m, bm), sk),
        threadgroup=(threads, 1, 1),
        out_shape=(m, n) if sk == 1 else (sk, m, n),
        out_dtype=out_dtype,
        reduce_splits=sk > 1,
    )
