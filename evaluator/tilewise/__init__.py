"""tilewise evaluator: policy -> plan per matmul, patching of mlx_lm models, honest A/B measurement.

Modules (flat, mlx-lm style): policy (schema, validation, hash, plan lookup), patch (apply/remove a
policy on a model), models (load or synthesize models, fingerprint, shapes), workloads (inference and
training runs), measure (interleaved pairs, bootstrap intervals), gate (correctness first), shapes
(matmul microbenchmarks), worker (the JSON-lines process the daemon drives).
"""

__version__ = "0.1.0"

# The mlx_lm plugin's user-facing API (tilewise.plugin), imported on first use so that
# `import tilewise` stays cheap for the worker and the daemon's tools.
_PLUGIN_API = ("enable_optimizations", "apply_to", "status", "disable")


def __getattr__(name):
    if name in _PLUGIN_API:
        from . import plugin

        return getattr(plugin, name)
    raise AttributeError(f"module 'tilewise' has no attribute {name!r}")
