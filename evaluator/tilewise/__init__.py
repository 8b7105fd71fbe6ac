"""tilewise evaluator: policy -> plan per matmul, patching of mlx_lm models, honest A/B measurement.

Modules (flat, mlx-lm style): policy (schema, validation, hash, plan lookup), patch (apply/remove a
policy on a model), models (load or synthesize models, fingerprint, shapes), workloads (inference and
training runs), measure (interleaved pairs, bootstrap intervals), gate (correctness first), shapes
(matmul microbenchmarks), worker (the JSON-lines process the daemon drives).
"""

__version__ = "0.1.0"
