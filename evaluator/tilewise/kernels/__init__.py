"""Kernel plans: custom matmul kernels whose tile sizes the policy chooses (docs/kernels.md).

Public interface (the patch module calls it lazily for plans of kind "kernel"):

- `kernel_matmul(x, w, plan)` -> x @ w.T through the plan's kernel; differentiable (native-matmul VJP).
- `kernel_supported(plan, backend=None)` -> (ok, reason); a plan for a backend this machine lacks is
  refused.
- `kernel_space(backend, m, n, k, dtype="bfloat16")` -> every valid plan for one problem: the search
  space the daemon's evolution walks (mirrored in docs/kernels.md).
- `plan_problems(plan, backend, dtype, m)` -> reasons a plan cannot run (empty = runnable).

Modules: plans (parameters, limits, space), launch (plan + problem -> launch geometry, pure Python),
cuda_source / metal_source (kernel bodies), matmul (MLX calls). Importing this package does not
import MLX until `kernel_matmul` or `kernel_supported` is first used.
"""

from .plans import GEMV_MAX_M, describe, kernel_space, plan_key, plan_problems


def __getattr__(name):
    # MLX-dependent names load on first use, so that policy tooling can import the plan space cheaply.
    if name in (
        "kernel_matmul",
        "kernel_matmul_checked",
        "kernel_supported",
        "machine_backend",
        "KernelUnavailable",
        "raw_kernel_fn",
    ):
        from . import matmul

        return getattr(matmul, name)
    if name in ("KernelPlanError", "Launch", "plan_launch"):
        from . import launch

        return getattr(launch, name)
    raise AttributeError(name)


__all__ = [
    "GEMV_MAX_M",
    "KernelPlanError",
    "KernelUnavailable",
    "describe",
    "kernel_matmul",
    "kernel_matmul_checked",
    "kernel_space",
    "kernel_supported",
    "machine_backend",
    "plan_key",
    "plan_problems",
]
