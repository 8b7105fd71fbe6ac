"""From a kernel plan and a problem (M, N, K, dtype) to one launch: which body, its constants,
grid, threadgroup and output. Pure Python (no MLX calls), so the CPU tests can check every launch the
search space can produce; `matmul.py` turns a `Launch` into an `mx.fast.*_kernel` call.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from . import cuda_source, metal_source
from .plans import SIMD_WIDTH, gemm_geometry, plan_problems


class KernelPlanError(ValueError):
    """A kernel plan that cannot run for this problem (the reason names the field)."""


# How each backend spells the element types.
TYPE_NAMES = {
    "cuda": {"bfloat16": "__nv_bfloat16", "float16": "__half", "float32": "float"},
    "metal": {"bfloat16": "bfloat16_t", "float16": "half", "float32": "float"},
}


@dataclass(frozen=True)
class Launch:
    """One kernel launch. The compile-time constants are baked into the source (not passed as MLX
    template arguments): each parameter set is its own kernel object and module, compiled once, and a
    call passes nothing but the two arrays and the geometry (the per-call cost matters at decode)."""

    backend: str  # "cuda" | "metal"
    body: str  # key into cuda_source.SOURCES / metal_source.SOURCES
    params: tuple = field(default=())  # ((name, int | dtype-name), ...) in declaration order
    grid: tuple = (1, 1, 1)  # threads, as MLX counts them
    threadgroup: tuple = (1, 1, 1)
    out_shape: tuple = ()
    out_dtype: str = "bfloat16"  # "float32" for split-K partials
    reduce_splits: bool = False  # out is (split_k, ..., N) partials: sum axis 0 and cast afterwards
    bias: bool = False  # a third input `bias` (N,) is added in the kernel's store

    @property
    def input_names(self) -> list:
        return ["x", "w", "bias"] if self.bias else ["x", "w"]

    @property
    def body_source(self) -> str:
        return (cuda_source.SOURCES if self.backend == "cuda" else metal_source.SOURCES)[self.body]

    @property
    def declarations(self) -> str:
        """The parameter set as declarations at the top of the kernel body."""
        names = TYPE_NAMES[self.backend]
        lines = []
        for name, v in self.params:
            lines.append(f"  using {name} = {names[v]};" if isinstance(v, str) else f"  constexpr int {name} = {v};")
        lines.append("#undef TW_BIAS")
        if not self.bias:
            lines.append("#define TW_BIAS(col)")
        else:
            to_f = "tw_to_f" if self.backend == "cuda" else "static_cast<float>"
            split0 = "blockIdx.z == 0" if self.backend == "cuda" else "z == 0"
            term = f"{to_f}(bias[col])"
            if self.reduce_splits:  # partial sums: only split 0 carries the bias
                term = f"({split0} ? {term} : 0.0f)"
            lines.append(f"#define TW_BIAS(col) + {term}")
        return "\n".join(lines) + "\n"

    @property
    def source(self) -> str:
        return self.declarations + self.body_source

    @property
    def kernel_name(self) -> str:
        """Unique per parameter set (MLX caches compiled modules by name)."""
        vals = "_".join(str(v) for _, v in self.params)
        return f"tilewise_{self.body}_{vals}" + ("_bias" if self.bias else "")


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def plan_launch(
    plan: dict, m: int, n: int, k: int, dtype: str, lead: tuple | None = None, bias: bool = False
) -> Launch:
    """The launch for `x (*lead, k) @ w (n, k).T (+ bias)` under `plan` (lead defaults to (m,), and its
    product must be m); raises KernelPlanError if it cannot run."""
    lead = (m,) if lead is None else tuple(lead)
    if math.prod(lead) != m:
        raise KernelPlanError(f"leading dims {lead} do not hold M = {m} rows")
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
            params=(("T", dtype), ("MR", m), ("R", r), ("S", sk), ("V", vw)),
            grid=(blocks * threads, 1, 1),
            threadgroup=(threads, 1, 1),
            out_shape=lead + (n,),
            out_dtype=dtype,
            bias=bias,
        )
    geo = gemm_geometry(plan, backend, dtype)
    bm, bn, bk, warps = plan["block_m"], plan["block_n"], plan["block_k"], plan["warps"]
    threads = geo["threads"]
    common = (
        ("XND", len(lead) + 1),
        ("BM", bm),
        ("BN", bn),
        ("BK", bk),
        ("WARPS", warps),
        ("V", vw),
        ("SPLIT", sk),
        ("LDS", geo["lds"]),
    )
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
        params=types + common + extra,
        grid=(_ceil_div(n, bn) * threads, _ceil_div(m, bm), sk),
        threadgroup=(threads, 1, 1),
        out_shape=lead + (n,) if sk == 1 else (sk,) + lead + (n,),
        out_dtype=out_dtype,
        reduce_splits=sk > 1,
        bias=bias,
    )
