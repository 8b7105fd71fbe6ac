"""`kernel_matmul(x, w, plan)`: x @ w.T through a custom kernel whose tiles the plan chooses.

Differentiable: the forward runs the custom kernel; the backward (`mx.custom_function` VJP) runs MLX's
native matmuls, dx = g @ w and dw = g.T @ x. So a kernel plan changes the forward pass of training
only; the gradient kernels stay the vendor's (bench/gpu/kernel_bench.py measures the step both ways).

Per-call cost matters: a decode step runs ~170 linears, each a few microseconds of GPU time. The first
call with a given (plan, shapes, dtype) validates and builds everything; later calls are one dict
lookup and the kernel call with prebuilt arguments.
"""

from __future__ import annotations

import math
from functools import lru_cache

import mlx.core as mx

from . import cuda_source
from .launch import KernelPlanError, Launch, plan_launch
from .plans import BACKENDS, plan_key, plan_problems


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
    bfloat16 dtype, the models' default; `kernel_matmul` re-checks for the actual dtype and M) and that
    the plan's backend is the machine's: a CUDA kernel is refused on Metal or CPU, and vice versa.
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


@lru_cache(maxsize=1024)
def _kernel_object(launch: Launch):
    """One `mx.fast.*_kernel` object per parameter set (its constants are baked into the source)."""
    make = mx.fast.cuda_kernel if launch.backend == "cuda" else mx.fast.metal_kernel
    kwargs = {"header": cuda_source.HEADER} if launch.backend == "cuda" else {}
    return make(
        name=launch.kernel_name,
        input_names=launch.input_names,
        output_names=["y"],
        source=launch.source,
        ensure_row_contiguous=True,
        **kwargs,
    )


def _forward_fn(launch: Launch, out_dtype, poison: float | None = None):
    """(x, w) or (x, w, bias) -> y for one launch, with every other argument prebuilt."""
    kernel = _kernel_object(launch)
    kwargs = {
        "grid": launch.grid,
        "threadgroup": launch.threadgroup,
        "output_shapes": [launch.out_shape],
        "output_dtypes": [_DTYPES[launch.out_dtype]],
    }
    if poison is not None:
        kwargs["init_value"] = poison  # e.g. NaN: an output element the kernel never writes shows up
    if launch.reduce_splits:
        return lambda *xwb: kernel(inputs=list(xwb), **kwargs)[0].sum(axis=0).astype(out_dtype)
    return lambda *xwb: kernel(inputs=list(xwb), **kwargs)[0]


def _validated_launch(plan: dict, x: mx.array, w: mx.array, bias: mx.array | None = None) -> Launch:
    if w.ndim != 2 or x.ndim < 1 or x.shape[-1] != w.shape[1]:
        raise KernelPlanError(f"shapes do not multiply: x {tuple(x.shape)} @ w {tuple(w.shape)}.T")
    if x.dtype != w.dtype or x.dtype not in _NAMES:
        raise KernelPlanError(f"kernel plans need x and w of one dtype in {list(_DTYPES)}, got {x.dtype}, {w.dtype}")
    if bias is not None and (bias.shape != (w.shape[0],) or bias.dtype != x.dtype):
        raise KernelPlanError(f"bias must be ({w.shape[0]},) {x.dtype}, got {tuple(bias.shape)} {bias.dtype}")
    ok, why = kernel_supported(plan)
    if not ok:
        if plan.get("backend") in BACKENDS and plan.get("backend") != machine_backend():
            raise KernelUnavailable(why)
        raise KernelPlanError(why)
    lead = tuple(x.shape[:-1]) or (1,)
    m, (n, k), dtype = math.prod(lead), w.shape, _NAMES[x.dtype]
    problems = plan_problems(plan, machine_backend(), dtype, m)
    if problems:
        raise KernelPlanError("; ".join(problems))
    return plan_launch(plan, m, n, k, dtype, lead=lead, bias=bias is not None)


def _differentiable(launch: Launch, x_dtype):
    """Kernel forward, native-matmul backward (and the bias gradient a sum over rows)."""
    forward_kernel = _forward_fn(launch, x_dtype)

    @mx.custom_function
    def forward(*xwb):
        return forward_kernel(*xwb)

    @forward.vjp
    def backward(primals, cotangent, output):
        x, w = primals[0], primals[1]
        g = cotangent[0] if isinstance(cotangent, (list, tuple)) else cotangent
        n, k = w.shape
        g2 = g.reshape(-1, n)
        grads = (g @ w, g2.T @ x.reshape(-1, k))
        return grads + (g2.sum(axis=0),) if len(primals) == 3 else grads

    return forward


# (plan_key, x.shape, w.shape, x.dtype, w.dtype, has bias) -> the prepared differentiable call.
# Bounded: a server sees a new x shape per prompt length; compiled modules stay cached in MLX by name.
_PREPARED: dict = {}
_PREPARED_MAX = 4096


def kernel_matmul(x: mx.array, w: mx.array, plan: dict, bias: mx.array | None = None) -> mx.array:
    """x (..., K) @ w (N, K).T (+ bias (N,)) -> (..., N) through the plan's kernel; the bias is added in
    the kernel's store (no extra op). Raises KernelUnavailable when the plan is for another backend,
    KernelPlanError when its parameters cannot serve this problem."""
    key = (plan_key(plan), x.shape, w.shape, x.dtype, w.dtype, bias is None)
    fn = _PREPARED.get(key)
    if fn is None:
        if len(_PREPARED) >= _PREPARED_MAX:
            _PREPARED.clear()
        fn = _PREPARED[key] = _differentiable(_validated_launch(plan, x, w, bias), x.dtype)
    return fn(x, w) if bias is None else fn(x, w, bias)


def kernel_matmul_checked(
    x: mx.array, w: mx.array, plan: dict, bias: mx.array | None = None, poison: float = float("nan")
) -> mx.array:
    """Forward only, with the output pre-filled with `poison` (NaN) so that an element the kernel never
    writes cannot pass a correctness check by luck. For tests and the benchmark's correctness column."""
    fn = _forward_fn(_validated_launch(plan, x, w, bias), x.dtype, poison)
    return fn(x, w) if bias is None else fn(x, w, bias)


def raw_kernel_fn(plan: dict, x: mx.array, w: mx.array):
    """The forward call without the custom_function wrapper (benchmarks measure what the wrapper costs)."""
    return _forward_fn(_validated_launch(plan, x, w), x.dtype)
