"""`kernel_matmul(x, w, plan)`: x @ w.T through a custom kernel whose tiles the plan chooses.

Differentiable: the forward runs the custom kernel; the backward (`mx.custom_function` VJP) runs MLX's
native matmuls, dx = g @ w and dw = g.T @ x. So a kernel plan changes the forward pass of training
only; the gradient kernels stay the vendor's (bench/gpu/kernel_bench.py measures the step both ways).
"""

from __future__ import annotations

import math
from functools import lru_cache

import mlx.core as mx

from . import cuda_source
from .launch import KernelPlanError, Launch, plan_launch  # noqa: F401 (plan_launch re-exported)
from .plans import BACKENDS, KEY_FIELDS as _KEY_FIELDS, plan_key, plan_problems


class KernelUnavailable(RuntimeError):
    """The plan's backend is not this machine's (e.g. a CUDA plan on a Mac, or anything on MLX CPU)."""


_DTYPES = {"bfloat16": mx.bfloat16, "float16": mx.float16, "float32": mx.float32}
_NAMES = {v: k for k, v in _DTYPES.items()}


@lru_cache(maxsize=1)
def machine_backend() -> str:
    """The MLX GPU backend this process runs on: "cuda", "metal", or "cpu" when it has neither."""
    if mx.metal.is_available():
        return "metal"
    if hasattr(mx, "cuda") and mx.cuda.is_available():
        return "cuda"
    return "cpu"


def kernel_supported(plan: dict, backend: str | None = None) -> tuple[bool, str]:
    """Can `plan` run on a machine whose backend is `backend` (default: this machine)?

    Returns (True, "") or (False, reason). Checks the plan's structure and parameter limits (for the
    bfloat16 dtype, the models' default; `kernel_matmul` re-checks for the actual dtype) and that the
    plan's backend is the machine's: a CUDA kernel is refused on Metal or CPU, and vice versa.
    """
    backend = backend or machine_backend()
    if not isinstance(plan, dict) or plan.get("kind") != "kernel":
        return False, "not a kernel plan"
    kb = plan.get("backend")
    if kb in BACKENDS and kb != backend:
        return False, f"kernel backend {kb} not available on {backend}"
    problems = plan_problems(plan, backend)
    if problems:
        return False, "; ".join(problems)
    return True, ""


@lru_cache(maxsize=None)
def _kernel_object(backend: str, body: str, source: str, header: str):
    """One `mx.fast.*_kernel` object per body. MLX compiles and caches one module per template-argument
    set under it, so every distinct tile set is compiled once per process."""
    name = f"tilewise_{body}"
    if backend == "cuda":
        return mx.fast.cuda_kernel(name=name, input_names=["x", "w"], output_names=["y"], source=source,
                                   header=header, ensure_row_contiguous=True)
    return mx.fast.metal_kernel(name=name, input_names=["x", "w"], output_names=["y"], source=source,
                                header=header, ensure_row_contiguous=True)


@lru_cache(maxsize=4096)
def _call_args(launch: Launch):
    """The kernel object and MLX-typed arguments of one launch, built once per launch."""
    header = cuda_source.HEADER if launch.backend == "cuda" else ""
    kernel = _kernel_object(launch.backend, launch.body, launch.source, header)
    template = [(name, _DTYPES[v] if isinstance(v, str) else v) for name, v in launch.template]
    return kernel, template, [launch.out_shape], [_DTYPES[launch.out_dtype]]


def _run(launch: Launch, x2: mx.array, w: mx.array, poison: float | None = None) -> mx.array:
    kernel, template, out_shapes, out_dtypes = _call_args(launch)
    kwargs = {}
    if poison is not None:
        kwargs["init_value"] = poison  # e.g. NaN: any output element the kernel fails to write shows up
    out = kernel(inputs=[x2, w], template=template, grid=launch.grid, threadgroup=launch.threadgroup,
                 output_shapes=out_shapes, output_dtypes=out_dtypes, **kwargs)[0]
    if launch.reduce_splits:
        out = out.sum(axis=0).astype(x2.dtype)
    return out


@lru_cache(maxsize=None)
def _differentiable(key: tuple):
    """The custom function (kernel forward, native-matmul backward) for one plan, built once."""
    plan = dict(zip(_KEY_FIELDS, key), kind="kernel")

    @mx.custom_function
    def forward(x2, w):
        m, k = x2.shape
        return _run(_prepared(key, m, w.shape[0], k, _NAMES[x2.dtype]), x2, w)

    @forward.vjp
    def backward(primals, cotangent, output):
        x2, w = primals
        g = cotangent[0] if isinstance(cotangent, (list, tuple)) else cotangent
        return g @ w, g.T @ x2

    return forward


def _check(x: mx.array, w: mx.array, plan: dict) -> tuple[int, int, int, str]:
    if w.ndim != 2 or x.ndim < 1 or x.shape[-1] != w.shape[1]:
        raise KernelPlanError(f"shapes do not multiply: x {tuple(x.shape)} @ w {tuple(w.shape)}.T")
    if x.dtype != w.dtype or x.dtype not in _NAMES:
        raise KernelPlanError(f"kernel plans need x and w of one dtype in {list(_DTYPES)}, got {x.dtype}, {w.dtype}")
    m = math.prod(x.shape[:-1])
    n, k = w.shape
    _prepared(plan_key(plan), m, n, k, _NAMES[x.dtype])
    return m, n, k, _NAMES[x.dtype]


@lru_cache(maxsize=4096)
def _prepared(key: tuple, m: int, n: int, k: int, dtype: str):
    """Validates one (plan, problem) once: a model calls the same few shapes thousands of times, and the
    per-call Python cost must stay far below a decode GEMV's few microseconds."""
    plan = dict(zip(_KEY_FIELDS, key), kind="kernel")
    ok, why = kernel_supported(plan)
    if not ok:
        if plan.get("backend") in BACKENDS and plan.get("backend") != machine_backend():
            raise KernelUnavailable(why)
        raise KernelPlanError(why)
    problems = plan_problems(plan, machine_backend(), dtype, m)
    if problems:
        raise KernelPlanError("; ".join(problems))
    return plan_launch(plan, m, n, k, dtype)


def kernel_matmul(x: mx.array, w: mx.array, plan: dict) -> mx.array:
    """x (..., K) @ w (N, K).T -> (..., N) through the plan's kernel. Raises KernelUnavailable when the
    plan is for another backend, KernelPlanError when its parameters cannot serve this problem."""
    m, n, k, _ = _check(x, w, plan)
    lead = x.shape[:-1]
    out = _differentiable(plan_key(plan))(x.reshape(m, k), w)
    return out.reshape(*lead, n)


def kernel_matmul_checked(x: mx.array, w: mx.array, plan: dict, poison: float = float("nan")) -> mx.array:
    """Forward only, with the output pre-filled with `poison` (NaN) so that an element the kernel never
    writes cannot pass a correctness check by luck. For tests and the benchmark's correctness column."""
    m, n, k, dtype = _check(x, w, plan)
    out = _run(_prepared(plan_key(plan), m, n, k, dtype), x.reshape(m, k), w, poison=poison)
    return out.reshape(*x.shape[:-1], n)
