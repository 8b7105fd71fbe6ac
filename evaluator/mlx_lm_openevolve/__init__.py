"""Compatibility with the OpenEvolve MLX-LM example's integration snippet:

    from mlx_lm_openevolve import enable_optimizations
    enable_optimizations("./openevolve_output/best/best_program.py")
    model, tokenizer = load("mlx-community/Qwen2.5-0.5B-Instruct-bf16")

That example rebound ``mx.matmul``, which ``nn.Linear`` never calls, so it changed nothing. Here the
same call goes through tilewise: the program's ``choose_tile_size`` is run only by the evaluator's
tabulate code, over the loaded model's shapes, and the resulting *data* policy is applied to every
model loaded afterwards (see ``tilewise.plugin``). ``path`` may also be a policy JSON; with no path
the tilewise daemon's proven policy is used.
"""

from tilewise.plugin import status

__all__ = ["enable_optimizations", "status"]


def enable_optimizations(path=None, *, model=None):
    """The example's signature (``path`` to ``best_program.py``); returns ``tilewise.status()``."""
    from tilewise.plugin import enable_optimizations as _enable

    return _enable(path, model=model)
