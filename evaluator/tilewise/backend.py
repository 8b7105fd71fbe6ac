"""What this process runs MLX on: the backend (`cpu`, `cuda`, `metal`) and the device's name.

Its own module because both sides need it — the plugin in the user's process (which policy fits this
machine) and the measuring worker — and the plugin must not import measurement code to learn it.
"""

import platform
import sys

import mlx.core as mx


def backend():
    """This process's MLX backend: "cpu", "cuda" or "metal"."""
    if mx.default_device().type == mx.DeviceType.cpu:
        return "cpu"
    return "metal" if sys.platform == "darwin" else "cuda"


def device_name():
    try:
        info = mx.device_info()
        name = info.get("device_name") or info.get("architecture")
        if name:
            return str(name)
    except Exception:  # older MLX or CPU-only builds have no device_info
        pass
    return f"{platform.machine()} cpu"
