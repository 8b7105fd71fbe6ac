"""Every generated CUDA kernel body compiles, on a machine without a GPU: NVRTC (the compiler MLX's CUDA
backend runs for `mx.fast.cuda_kernel`) compiles the same translation unit MLX builds — our header, a
`__global__` signature like MLX's, the baked constants and the body — for sm_90 (the H100).
scripts/setup.d/50-kernels-nvrtc.sh installs NVRTC and CUDA's headers from PyPI.

Only compilation is checked here; test_kernels_gpu.py runs the kernels. The signature stand-in differs
from MLX's in one place: MLX's `Shape` is its own fixed-size array type, replaced by a struct with the
same `operator[]`.
"""

import ctypes
import glob
import os

import pytest

from tilewise.kernels import cuda_source, kernel_space, plan_launch

CUDA_TYPES = {"bfloat16": "__nv_bfloat16", "float16": "__half", "float32": "float"}
SHAPE_STANDIN = "struct Shape { int d[8]; __device__ __forceinline__ int operator[](int i) const { return d[i]; } };\n"


def _nvrtc():
    try:
        import nvidia
    except ImportError:
        return None, None
    for root in nvidia.__path__:
        base = os.path.join(root, "cu13")
        libs = glob.glob(os.path.join(base, "lib", "libnvrtc.so.*"))
        builtins = glob.glob(os.path.join(base, "lib", "libnvrtc-builtins.so.*"))
        if libs and builtins and os.path.isfile(os.path.join(base, "include", "crt", "mma.h")):
            ctypes.CDLL(builtins[0], mode=ctypes.RTLD_GLOBAL)  # NVRTC dlopens it by soname
            return ctypes.CDLL(libs[0]), os.path.join(base, "include")
    return None, None


LIB, INCLUDE = _nvrtc()
if LIB is None:
    if os.environ.get("CI"):
        raise RuntimeError("NVRTC missing: scripts/setup.d/50-kernels-nvrtc.sh should have installed it")
    pytest.skip("NVRTC not installed (run scripts/setup)", allow_module_level=True)


def compile_cuda(source: str, name: str) -> tuple[int, str]:
    """(nvrtcResult, log) for one translation unit compiled for compute_90."""
    prog = ctypes.c_void_p()
    assert LIB.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), f"{name}.cu".encode(), 0, None, None) == 0
    opts = [b"--gpu-architecture=compute_90", b"--std=c++17", f"-I{INCLUDE}".encode()]
    result = LIB.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
    size = ctypes.c_size_t()
    LIB.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    LIB.nvrtcGetProgramLog(prog, log)
    LIB.nvrtcDestroyProgram(ctypes.byref(prog))
    return result, log.value.decode(errors="replace")


def translation_unit(launch) -> str:
    """What MLX's cuda custom kernel builds: header, then the kernel in namespace mlx::core::cu with
    each input's pointer (and `<name>_shape` when the body mentions it), then the output pointer."""
    dtype = dict(launch.params)["T"]
    params = []
    for name in launch.input_names:
        params.append(f"const {CUDA_TYPES[dtype]}* {name}")
        if f"{name}_shape" in launch.source:
            params.append(f"const __grid_constant__ Shape {name}_shape")
    params.append(f"{CUDA_TYPES[launch.out_dtype]}* y")
    return (
        SHAPE_STANDIN
        + cuda_source.HEADER
        + "namespace mlx::core::cu {\n__global__ void custom_kernel_"
        + launch.kernel_name
        + "("
        + ", ".join(params)
        + ") {\n"
        + launch.source
        + "\n}\n}\n"
    )


def _launches():
    """Every body x dtype x bias x leading dims, over plans spread across the space (~30 compiles)."""
    out = []
    for dtype in ("bfloat16", "float16", "float32"):
        for m, lead in ((4, (1, 4)), (300, (300,))):
            space = kernel_space("cuda", m, 896, 4864, dtype)
            for i, plan in enumerate(space[:: max(1, len(space) // 5)]):
                out.append(pytest.param(plan, m, lead, dtype, i % 2 == 1, id=f"{dtype}-m{m}-{plan['family']}-{i}"))
    return out


@pytest.mark.parametrize("plan,m,lead,dtype,bias", _launches())
def test_generated_cuda_kernel_compiles(plan, m, lead, dtype, bias):
    launch = plan_launch(plan, m, 896, 4864, dtype, lead=lead, bias=bias)
    result, log = compile_cuda(translation_unit(launch), launch.kernel_name)
    assert result == 0, log


def test_the_compile_check_rejects_a_broken_body():
    launch = plan_launch(kernel_space("cuda", 4, 896, 896)[0], 4, 896, 896, "bfloat16")
    broken = translation_unit(launch).replace("acc[i] +=", "acc[i] += undefined_symbol +", 1)
    result, log = compile_cuda(broken, "broken")
    assert result != 0 and "undefined_symbol" in log
