"""Run `mx.fast.metal_kernel` bodies on the CPU: a C++20 emulation of the MSL subset they use.

Why: no Mac is available to this project, yet the Metal kernel bodies (metal_source.py) ship. This
module wraps a body exactly as MLX's `metal_kernel` does (mlx/backend/metal/custom_kernel.cpp and
mlx/fast.cpp, `write_signature`: each input as `const device T*`, or `const constant T*` when it has
fewer than 8 elements, then `const constant int* <name>_shape` when the body mentions it, then the
outputs as `device T*`, then every Metal attribute whose name occurs in the body), compiles it with
g++ against msl_shim.h (types, address spaces, barriers, simd_sum) and runtime.h (the dispatch: grid
counted in threads, partial edge threadgroups, one fiber per thread, guard pages, poisoned memory,
several thread orders that must agree bit for bit), runs it on given inputs and returns the output.

What it shows: the bodies' logic (indexing, remainders, barriers, simd_sum use, split-K, bias, dtype
rounding) on every launch the tests draw. What it cannot show: that Apple's Metal compiler accepts the
source (MSL's type rules are only approximated), register/threadgroup limits of a real pipeline, or
speed. docs/kernels.md says the same.

The one source rewrite: `threadgroup T name[N];` becomes a reference to the group's shared array
(C++ has no per-group storage class); every other line of the body is compiled as written.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import struct
import subprocess
import tempfile
import threading
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
CXX_FLAGS = ["-std=c++20", "-O1", "-w"]

# MLX's get_type_string for the dtypes kernel plans use.
TYPE_NAMES = {"bfloat16": "bfloat16_t", "float16": "half", "float32": "float"}
ITEMSIZE = {"bfloat16": 2, "float16": 2, "float32": 4}
MAX_CONSTANT_ARRAY_SIZE = 8  # MLX: inputs with fewer elements are `const constant T*`

# MLX's table, in its order: (attribute, type, the emulator's ThreadPos field or None if unsupported).
METAL_ATTRIBUTES = (
    ("dispatch_quadgroups_per_threadgroup", "uint", None),
    ("dispatch_simdgroups_per_threadgroup", "uint", None),
    ("dispatch_threads_per_threadgroup", "uint3", "dispatch_threads_per_threadgroup"),
    ("grid_origin", "uint3", None),
    ("grid_size", "uint3", None),
    ("quadgroup_index_in_threadgroup", "uint", None),
    ("quadgroups_per_threadgroup", "uint", None),
    ("simdgroup_index_in_threadgroup", "uint", "simdgroup_index_in_threadgroup"),
    ("simdgroups_per_threadgroup", "uint", "simdgroups_per_threadgroup"),
    ("thread_execution_width", "uint", "thread_execution_width"),
    ("thread_index_in_quadgroup", "uint", None),
    ("thread_index_in_simdgroup", "uint", "thread_index_in_simdgroup"),
    ("thread_index_in_threadgroup", "uint", "thread_index_in_threadgroup"),
    ("thread_position_in_grid", "uint3", "thread_position_in_grid"),
    ("thread_position_in_threadgroup", "uint3", "thread_position_in_threadgroup"),
    ("threadgroup_position_in_grid", "uint3", "threadgroup_position_in_grid"),
    ("threadgroups_per_grid", "uint3", "threadgroups_per_grid"),
    ("threads_per_grid", "uint3", "threads_per_grid"),
    ("threads_per_simdgroup", "uint", "threads_per_simdgroup"),
    ("threads_per_threadgroup", "uint3", "threads_per_threadgroup"),
)

SCHEDULES = ("fwd", "rev", "shuffle")
_THREADGROUP_DECL = re.compile(r"\bthreadgroup\s+([A-Za-z_]\w*)\s+([A-Za-z_]\w*)\s*\[([^\]\n]+)\]\s*;")


_RUNTIME_LOCK = threading.Lock()


class EmulatorError(RuntimeError):
    """The kernel failed under emulation: compile error, race, deadlock, out-of-bounds access."""


class CompilerMissing(EmulatorError):
    """No g++: scripts/setup installs it (scripts/setup.d/15-cxx.sh)."""


def compiler() -> str:
    """The C++20 compiler: $CXX if set, else g++ on PATH."""
    name = os.environ.get("CXX") or "g++"
    cxx = shutil.which(name)
    if not cxx:
        raise CompilerMissing(f"{name} not found: run scripts/setup (scripts/setup.d/15-cxx.sh installs g++)")
    return cxx


# ---- dtype storage (numpy has no bfloat16: bf16 travels as its uint16 bits) ----


def to_storage(a, dtype: str) -> np.ndarray:
    """Round float values to `dtype` (nearest even) and return the raw storage array."""
    a = np.asarray(a, dtype=np.float32)
    if dtype == "float32":
        return a.copy()
    if dtype == "float16":
        with np.errstate(over="ignore"):  # beyond 65504 rounds to inf, as intended
            return a.astype(np.float16)
    if dtype == "bfloat16":
        u = a.view(np.uint32).astype(np.uint64)
        nan = np.isnan(a)
        r = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
        return np.where(nan, ((u >> 16) | 0x40).astype(np.uint16), r)
    raise ValueError(f"dtype {dtype!r} not in {list(TYPE_NAMES)}")


def from_storage(raw: np.ndarray, dtype: str) -> np.ndarray:
    """Exact float64 values of a raw storage array."""
    if dtype == "bfloat16":
        return (raw.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    return raw.astype(np.float64)


def poison(shape, dtype: str, value: float = float("nan")) -> np.ndarray:
    """A storage array of `shape` filled with `value` (MLX's init_value)."""
    return to_storage(np.full(shape, value, dtype=np.float32), dtype)


# ---- translation unit ----


def translation_unit(name: str, source: str, inputs, output: tuple) -> str:
    """The C++ program for one kernel: MLX's signature around `source`, then a driver.

    `inputs`: [(name, dtype, shape)] in input_names order; `output`: (name, dtype)."""
    params, args = [], []
    for i, (iname, dtype, shape) in enumerate(inputs):
        if len(shape) == 0:
            raise EmulatorError(f"input {iname}: 0-d inputs (MLX passes them by reference) are not emulated")
        space = "constant" if int(np.prod(shape)) < MAX_CONSTANT_ARRAY_SIZE else "device"
        ctype = TYPE_NAMES[dtype]
        params.append(f"  const {space} {ctype}* {iname}")
        args.append(f"(const {space} {ctype}*)tw::input_data({i})")
        if f"{iname}_shape" in source:
            params.append(f"  const constant int* {iname}_shape")
            args.append(f"(const constant int*)tw::input_shape({i})")
        for suffix in ("_strides", "_ndim"):
            if f"{iname}{suffix}" in source:
                raise EmulatorError(f"{iname}{suffix} is not emulated")
    oname, odtype = output
    params.append(f"  device {TYPE_NAMES[odtype]}* {oname}")
    args.append(f"(device {TYPE_NAMES[odtype]}*)tw::output_data()")
    for attr, typ, field in METAL_ATTRIBUTES:
        if attr in source:  # MLX's test: the name occurs anywhere in the source
            if field is None:
                raise EmulatorError(f"Metal attribute {attr} is not emulated")
            params.append(f"  {typ} {attr}")
            args.append(f"p.{field}")
    body = _THREADGROUP_DECL.sub(r"TW_THREADGROUP_ARRAY(\1, \2, (\3));", source)
    return (
        '#include "runtime.h"\n#include "msl_shim.h"\n\n'
        f"static void custom_kernel_{name}(\n" + ",\n".join(params) + ") {\n"
        '#line 1 "kernel_body"\n' + body + "\n}\n\n"
        '#line 10000 "emulator_driver"\n'
        "static void tw_invoke(const tw::ThreadPos& p) {\n"
        f"  custom_kernel_{name}(" + ", ".join(args) + ");\n}\n\n"
        f"int main(int argc, char** argv) {{ return tw::run_main(argc, argv, tw_invoke, {len(inputs)}); }}\n"
    )


def cache_dir() -> Path:
    d = Path(os.environ.get("TILEWISE_METAL_EMU_CACHE") or Path(tempfile.gettempdir()) / "tilewise-metal-emu")
    d.mkdir(parents=True, exist_ok=True)
    return d


def _digest(*parts: str) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()[:24]


def _compile(args: list, out: Path) -> Path:
    """Run g++ into a private temporary name, then move it into place (safe under parallel builds)."""
    tmp = out.with_name(f"{out.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    proc = subprocess.run([compiler(), *CXX_FLAGS, f"-I{HERE}", *args, "-o", str(tmp)], capture_output=True, text=True)
    if proc.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise EmulatorError(f"compile error (g++):\n{proc.stderr[-6000:]}")
    os.replace(tmp, out)
    return out


def _runtime_object() -> Path:
    """runtime.cpp compiled once per (source, flags, compiler) into the cache."""
    runtime = (HERE / "runtime.cpp").read_text() + (HERE / "runtime.h").read_text()
    obj = cache_dir() / f"rt_{_digest(runtime, ' '.join(CXX_FLAGS), compiler())}.o"
    if not obj.exists():
        with _RUNTIME_LOCK:
            if not obj.exists():
                _compile(["-c", str(HERE / "runtime.cpp")], obj)
    return obj


def build(tu: str) -> Path:
    """Compile `tu` and link it with the runtime (cached by a hash of it, the shim, the runtime and
    the flags); returns the executable."""
    rt = _runtime_object()
    exe = cache_dir() / f"k_{_digest(tu, (HERE / 'msl_shim.h').read_text(), rt.name)}"
    if exe.exists():
        return exe
    src = exe.with_name(f"{exe.name}.{os.getpid()}.{threading.get_ident()}.cpp")
    src.write_text(tu)
    try:
        return _compile([str(src), str(rt)], exe)
    finally:
        src.unlink(missing_ok=True)


def emulate(
    name: str,
    source: str,
    inputs,
    output: tuple,
    out_shape,
    grid,
    threadgroup,
    init: np.ndarray | None = None,
    schedules=SCHEDULES,
    timeout: float = 120.0,
) -> np.ndarray:
    """Run one dispatch. `inputs`: [(name, dtype, storage array)]; `output`: (name, dtype); `init`:
    the output's initial storage (default NaN everywhere, like MLX's init_value=nan). Returns the
    output storage array. Raises EmulatorError with the emulator's diagnosis on any failure."""
    oname, odtype = output
    tu = translation_unit(name, source, [(n, d, tuple(a.shape)) for n, d, a in inputs], output)
    exe = build(tu)
    if init is None:
        init = poison(out_shape, odtype)
    store = np.float32 if odtype == "float32" else (np.float16 if odtype == "float16" else np.uint16)
    init = np.ascontiguousarray(init, dtype=store)
    if init.shape != tuple(out_shape):
        raise ValueError(f"init shape {init.shape} != out_shape {tuple(out_shape)}")
    with tempfile.TemporaryDirectory(prefix="twemu") as d:
        blob = [struct.pack("<6q", *grid, *threadgroup), struct.pack("<q", len(inputs))]
        for _, dtype, a in inputs:
            a = np.ascontiguousarray(a)
            if a.dtype.itemsize != ITEMSIZE[dtype]:
                raise ValueError(f"storage of {dtype} must have itemsize {ITEMSIZE[dtype]}, got {a.dtype}")
            blob += [
                struct.pack("<q", a.ndim),
                struct.pack(f"<{a.ndim}q", *a.shape),
                struct.pack("<q", a.nbytes),
                a.tobytes(),
            ]
        blob += [struct.pack("<q", init.nbytes), init.tobytes()]
        fin, fout = Path(d) / "in.bin", Path(d) / "out.bin"
        fin.write_bytes(b"".join(blob))
        try:
            proc = subprocess.run(
                [str(exe), str(fin), str(fout), ",".join(schedules)], capture_output=True, text=True, timeout=timeout
            )
        except subprocess.TimeoutExpired as e:
            raise EmulatorError(f"emulated kernel ran over {timeout} s") from e
        if proc.returncode != 0:
            raise EmulatorError(proc.stderr.strip()[-4000:] or f"emulated kernel exited with {proc.returncode}")
        return np.frombuffer(fout.read_bytes(), dtype=store).reshape(out_shape).copy()


def launch_translation_unit(launch, shapes, source: str | None = None) -> str:
    """The program for a tilewise `Launch` with inputs of `shapes` (launch.input_names order)."""
    if launch.backend != "metal":
        raise ValueError("only Metal launches are emulated")
    dtype = dict(launch.params)["T"]
    inputs = [(n, dtype, tuple(s)) for n, s in zip(launch.input_names, shapes, strict=True)]
    return translation_unit(
        launch.kernel_name, launch.source if source is None else source, inputs, ("y", launch.out_dtype)
    )


def emulate_launch(launch, arrays, source: str | None = None, **kw) -> np.ndarray:
    """Run a tilewise `Launch` (kernels/launch.py) on storage arrays given in `launch.input_names`
    order, as `matmul._forward_fn` runs it through MLX (NaN-initialised output). Returns the raw
    kernel output (split-K partials unreduced). `source` replaces launch.source (mutation tests)."""
    if launch.backend != "metal":
        raise ValueError("only Metal launches are emulated")
    dtype = dict(launch.params)["T"]
    inputs = [(n, dtype, a) for n, a in zip(launch.input_names, arrays, strict=True)]
    return emulate(
        launch.kernel_name,
        launch.source if source is None else source,
        inputs,
        ("y", launch.out_dtype),
        launch.out_shape,
        launch.grid,
        launch.threadgroup,
        **kw,
    )
