"""tilewise's Python side: the mlx_lm plugin, and the worker that measures policies for the daemon.

Flat modules in the mlx-lm style, in three groups by where they run:

- In a user's mlx_lm process (the plugin, and nothing that measures): `plugin` (enable_optimizations,
  apply_to, status, disable), `daemon_client` (the socket protocol), `policy` (schema, validation,
  content hash, plan lookup), `fusion` (sibling layers run as one matmul), `patch` (per-call plans),
  `kernels` (custom kernel plans), `models` (fingerprint, shapes), `backend` (what MLX runs on),
  `tabulate` (a user's own OpenEvolve program, run out of process).
- In the daemon's measuring worker (`python -m tilewise.worker`): `worker` (the JSON-lines process),
  `evaluate` (one candidate end to end), `gate` (correctness first), `measure` (interleaved pairs,
  bootstrap intervals), `shapes` (matmul microbenchmarks), `workloads` (generation and training runs),
  `models` (loading and synthesizing models).
- Test tools: `kernels.metal_emu` (the Metal kernel bodies on the CPU), `patch.plant_bug` and
  `fusion.plant_bug` (deliberately wrong plans, for the correctness gate's tests).

`python -m tilewise.mlx_lm <mlx_lm subcommand>` runs mlx_lm with the plugin on.
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
