"""One kernel of each body on fresh random inputs, printing the generated source on failure: the cheapest
check that everything compiles before a long benchmark spends device time."""

import math
import sys
import traceback
from pathlib import Path

import mlx.core as mx

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "evaluator"))
from tilewise.kernels import kernel_matmul_checked, plan_launch  # noqa: E402

PLANS = [
    (
        "bfloat16",
        3,
        {"kind": "kernel", "backend": "cuda", "family": "gemv", "rows_per_block": 4, "split_k": 2, "vector_width": 8},
    ),
    (
        "bfloat16",
        130,
        {
            "kind": "kernel",
            "backend": "cuda",
            "family": "gemm",
            "block_m": 64,
            "block_n": 64,
            "block_k": 32,
            "warps": 4,
            "vector_width": 8,
            "split_k": 2,
        },
    ),
    (
        "float32",
        130,
        {
            "kind": "kernel",
            "backend": "cuda",
            "family": "gemm",
            "block_m": 64,
            "block_n": 64,
            "block_k": 16,
            "warps": 4,
            "vector_width": 4,
            "split_k": 1,
        },
    ),
]
failed = 0
for dtype, m, plan in PLANS:
    n, k = 200, 300
    dt = getattr(mx, dtype)
    x = mx.random.normal((m, k)).astype(dt)
    w = (mx.random.normal((n, k)) / math.sqrt(k)).astype(dt)
    try:
        out = kernel_matmul_checked(x, w, plan).astype(mx.float32)
        ref = x.astype(mx.float32) @ w.astype(mx.float32).T
        err = (mx.linalg.norm((out - ref).flatten()) / mx.linalg.norm(ref.flatten())).item()
        print(f"smoke {dtype} {plan_launch(plan, m, n, k, dtype).body}: rel err {err:.2e}", flush=True)
        failed += not (err < 1e-2)
    except Exception:
        failed += 1
        traceback.print_exc()
        from tilewise.kernels import cuda_source

        launch = plan_launch(plan, m, n, k, dtype)
        print("---- header ----\n" + cuda_source.HEADER + "\n---- body ----\n" + launch.source)
sys.exit(1 if failed else 0)
