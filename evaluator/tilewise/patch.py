"""Apply a policy to a loaded MLX model so that every linear matmul runs through its plan.

Why class swapping: Python looks up `__call__` on the *type*, so assigning `layer.__call__ = f` on an
instance does nothing, and rebinding `mx.matmul` (what the seed project did) is never reached by
`nn.Linear` (it calls `x @ W.T` / `mx.addmm`). We therefore swap each layer's class for a subclass
(`layer.__class__ = TilewiseLinear`). That keeps the parameter tree, module names and weights
untouched (no wrapper module appears in `model.parameters()`), costs nothing to undo, and is exact:
`remove()` swaps the original class back.

Patched layers: `nn.Linear`, `nn.QuantizedLinear` (their `__call__`) and `nn.Embedding` /
`nn.QuantizedEmbedding` (their `as_linear`, i.e. a tied output head; the lookup itself is untouched).
Only these exact classes are patched; subclasses from other libraries may change `__call__` semantics,
so they are left alone.

At call time a layer computes M = product of x's leading dims, N = output features, K = input
features, and runs the plan `policy.plan_for(M, N, K)` (memoised per (N, K) and input size):

- native: the base class's own method, so the result is bit-identical to stock by construction;
- split: tiles along M, N and/or K with MLX ops (slices, matmuls, concatenate, a sum over K tiles);
- kernel: `tilewise.kernels.kernel_matmul(x, w, plan)` (imported lazily; owned by the kernels work).
"""

import math

import mlx.core as mx
import mlx.nn as nn

from . import policy

# Per-kind call counters. A plain dict increment per matmul call: cheap enough to stay on always.
_CALLS = {"native": 0, "split": 0, "kernel": 0}

# Test hook: a deliberately wrong split, to prove the correctness gate rejects wrong plans.
# None, "drop_last_k_tile" (omit the last K tile's partial product) or "raise" (the plan throws).
_PLANTED_BUG = None
PLANTED_BUGS = (None, "drop_last_k_tile", "raise")


class PlanError(RuntimeError):
    """A plan cannot run on this layer (e.g. a kernel plan on quantized weights)."""


def call_counts():
    """Matmul calls per plan kind since the last reset (a copy)."""
    return dict(_CALLS)


def reset_call_counts():
    for k in _CALLS:
        _CALLS[k] = 0


def plant_bug(kind):
    """Test only: make every split plan wrong in a known way (see _PLANTED_BUG); None clears it."""
    global _PLANTED_BUG
    if kind not in PLANTED_BUGS:
        raise ValueError(f"unknown planted bug {kind!r}; known: {PLANTED_BUGS}")
    _PLANTED_BUG = kind


# ---------------------------------------------------------------------------------------------
# Plan execution. Each layer type provides `_tw_block(x2, n0, n1, k0, k1, k)` =
# x2[:, k0:k1] @ W[n0:n1, k0:k1].T for its weight format; the split logic is shared.


def _tiles(size, tile):
    if tile is None or tile >= size:
        return [(0, size)]
    return [(i, min(i + tile, size)) for i in range(0, size, tile)]


def _split_matmul(layer, x, n, k, plan):
    """x @ W.T through tiles of the plan; bias (if any) added once at the end."""
    tile_k = plan["tile_k"]
    if tile_k is not None and hasattr(layer, "_tw_k_align"):
        align = layer._tw_k_align()
        tile_k = -(-tile_k // align) * align  # quantized weights split only at group boundaries
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    k_tiles = _tiles(k, tile_k)
    if _PLANTED_BUG == "raise":
        raise PlanError("planted bug: split plan raises")
    if _PLANTED_BUG == "drop_last_k_tile" and len(k_tiles) > 1:
        k_tiles = k_tiles[:-1]
    rows = []
    for m0, m1 in _tiles(m, plan["tile_m"]):
        xm = x2[m0:m1] if (m0, m1) != (0, m) else x2
        cols = []
        for n0, n1 in _tiles(n, plan["tile_n"]):
            acc = None
            for k0, k1 in k_tiles:
                part = layer._tw_block(xm, n0, n1, k0, k1, k)
                acc = part if acc is None else acc + part
            cols.append(acc)
        rows.append(cols[0] if len(cols) == 1 else mx.concatenate(cols, axis=1))
    y = rows[0] if len(rows) == 1 else mx.concatenate(rows, axis=0)
    bias = layer.get("bias") if "bias" in layer else None
    if bias is not None:
        y = y + bias
    return y.reshape(*lead, n)


def _kernel_matmul(layer, x, n, k, plan):
    if not hasattr(layer, "_tw_dense_weight"):
        raise PlanError(f"kernel plans need dense weights; {type(layer).__mro__[1].__name__} is quantized")
    from .kernels import kernel_matmul  # lazy: only kernel plans need the kernels package

    # The bias is added in the kernel's store (one op, like stock's addmm).
    return kernel_matmul(x, layer._tw_dense_weight(), plan, bias=layer["bias"] if "bias" in layer else None)


class _Resolver:
    """The applied policy for one model: plan per (M, N, K), memoised.

    Stored as a plain Python attribute on each patched layer (not an mx.array/dict/list, so MLX's
    Module keeps it out of the parameter tree).
    """

    __slots__ = ("policy", "policy_hash", "_cache", "_by_nk")

    def __init__(self, doc):
        self.policy = doc
        self.policy_hash = policy.content_hash(doc)
        self._cache = {}
        # (N, K) -> {x.size: (kind, plan)}: the per-layer dispatch tables, shared by every layer
        # with this (N, K) (the plan depends only on M, N, K, and M = x.size // K) and kept across
        # re-applications of this prepared policy, so the A/B loop, which applies and removes the
        # policy around every sample, times the warm dispatch a long-lived process has rather
        # than re-resolving every layer in every sample.
        self._by_nk = {}

    def dispatch_table(self, n, k):
        table = self._by_nk.get((n, k))
        if table is None:
            table = self._by_nk[(n, k)] = {}
        return table

    def plan(self, m, n, k):
        key = (m, n, k)
        plan = self._cache.get(key)
        if plan is None:
            plan = self._cache[key] = policy.plan_for(self.policy, m, n, k)
        return plan


def _resolve(layer, x):
    """First call of a layer with this input size: pick and memoise (kind, plan) on the layer."""
    k = x.shape[-1]
    n = layer["weight"].shape[0]
    m = 1
    for d in x.shape[:-1]:
        m *= d
    plan = layer._tw_resolver.plan(m, n, k)
    entry = layer._tw_plans[x.size] = (plan["kind"], plan)
    return entry


def _run_plan(layer, x, kind, plan):
    n = layer["weight"].shape[0]
    k = x.shape[-1]
    if kind == "split":
        return _split_matmul(layer, x, n, k, plan)
    return _kernel_matmul(layer, x, n, k, plan)


# The per-call path below is kept minimal on purpose (the native policy's overhead goal is >= 0.99
# of stock generation speed): one dict lookup keyed by x.size on the layer (an int: reading x.shape
# builds a tuple and hashing it costs twice as much, ~120 ns more per call; the table is per (N, K),
# so x.size fixes M), one counter increment, then the stock method itself for native.


class TilewiseLinear(nn.Linear):
    def __call__(self, x):
        entry = self._tw_plans.get(x.size) or _resolve(self, x)
        kind = entry[0]
        _CALLS[kind] += 1
        if kind == "native":
            return _LINEAR_CALL(self, x)
        return _run_plan(self, x, kind, entry[1])

    def _tw_dense_weight(self):
        return self["weight"]

    def _tw_block(self, x2, n0, n1, k0, k1, k):
        w = self["weight"]
        n = w.shape[0]
        if (n0, n1) != (0, n):
            w = w[n0:n1]
        if (k0, k1) != (0, k):
            w = w[:, k0:k1]
            x2 = x2[:, k0:k1]
        return x2 @ w.T


class _QuantizedBlocks:
    """Row/column blocks of a quantized weight: rows are output features; columns are packed
    `32 // bits` values per uint32 with one scale (and bias) per `group_size` inputs."""

    def _tw_k_align(self):
        align = self.group_size
        # A K tile must start on a whole uint32 of packed values as well as on a group boundary.
        return align * 32 // math.gcd(align * self.bits, 32) if (align * self.bits) % 32 else align

    def _tw_block(self, x2, n0, n1, k0, k1, k):
        w, s, b = self["weight"], self["scales"], self.get("biases")
        rows = slice(n0, n1)
        if (k0, k1) != (0, k):
            wcols = slice(k0 * self.bits // 32, k1 * self.bits // 32)
            gcols = slice(k0 // self.group_size, k1 // self.group_size)
            x2 = x2[:, k0:k1]
            w, s = w[rows, wcols], s[rows, gcols]
            b = b[rows, gcols] if b is not None else None
        else:
            w, s = w[rows], s[rows]
            b = b[rows] if b is not None else None
        return mx.quantized_matmul(
            x2,
            w,
            scales=s,
            biases=b,
            transpose=True,
            group_size=self.group_size,
            bits=self.bits,
            mode=self.mode,
        )


class TilewiseQuantizedLinear(_QuantizedBlocks, nn.QuantizedLinear):
    def __call__(self, x):
        entry = self._tw_plans.get(x.size) or _resolve(self, x)
        kind = entry[0]
        _CALLS[kind] += 1
        if kind == "native":
            return _QLINEAR_CALL(self, x)
        return _run_plan(self, x, kind, entry[1])


class TilewiseEmbedding(nn.Embedding):
    """Tied output head: only `as_linear` goes through the policy."""

    def as_linear(self, x):
        entry = self._tw_plans.get(x.size) or _resolve(self, x)
        kind = entry[0]
        _CALLS[kind] += 1
        if kind == "native":
            return _EMBEDDING_AS_LINEAR(self, x)
        return _run_plan(self, x, kind, entry[1])

    _tw_dense_weight = TilewiseLinear._tw_dense_weight
    _tw_block = TilewiseLinear._tw_block


class TilewiseQuantizedEmbedding(_QuantizedBlocks, nn.QuantizedEmbedding):
    def as_linear(self, x):
        entry = self._tw_plans.get(x.size) or _resolve(self, x)
        kind = entry[0]
        _CALLS[kind] += 1
        if kind == "native":
            return _QEMBEDDING_AS_LINEAR(self, x)
        return _run_plan(self, x, kind, entry[1])


# The stock methods native plans call (bit-identical to stock by construction).
_LINEAR_CALL = nn.Linear.__call__
_QLINEAR_CALL = nn.QuantizedLinear.__call__
_EMBEDDING_AS_LINEAR = nn.Embedding.as_linear
_QEMBEDDING_AS_LINEAR = nn.QuantizedEmbedding.as_linear

# stock class -> patched subclass (exact types only; see the module doc).
PATCHED = {
    nn.Linear: TilewiseLinear,
    nn.QuantizedLinear: TilewiseQuantizedLinear,
    nn.Embedding: TilewiseEmbedding,
    nn.QuantizedEmbedding: TilewiseQuantizedEmbedding,
}
_STOCK = {v: k for k, v in PATCHED.items()}


class Handle:
    """What `apply` returns: the policy in force, its hash, the patched layer names; `remove()`."""

    def __init__(self, model, resolver, layers):
        self.model = model
        self.policy = resolver.policy
        self.policy_hash = resolver.policy_hash
        self.layers = layers

    def remove(self):
        remove(self.model)

    def __repr__(self):
        return f"<tilewise policy {self.policy_hash[:19]}… on {len(self.layers)} layers>"


def prepare(doc):
    """Validates `doc` once (PolicyError) and returns it ready for repeated `apply` calls: the A/B
    loop switches policies before every sample and must not re-validate each time."""
    policy.validate(doc)
    return _Resolver(doc)


def layer_nk(module):
    """(N, K) of a linear-like layer (quantized weights pack `32 // bits` values per uint32 along K)."""
    w = module["weight"]
    bits = getattr(module, "bits", None)
    return w.shape[0], (w.shape[1] * 32 // bits if bits else w.shape[1])


def apply(model, doc, *, reachable_only=False):
    """Routes the linear matmuls of `model` through `doc`'s plans. Re-applying replaces the policy.

    `doc` is a policy dict (validated first: PolicyError on a bad policy) or the result of
    `prepare(doc)`. Plan choices are memoised per (N, K) and input size, across applications.
    By default every linear layer is patched (so every call is counted). With `reachable_only`,
    layers that no M can route to a non-native plan (`policy.may_leave_native`) stay stock and pay
    no dispatch cost, as in the plugin; only the patched layers' calls are counted then.
    """
    resolver = doc if isinstance(doc, _Resolver) else prepare(doc)
    remove(model)  # a re-application must not leave layers of the previous policy patched
    layers = []
    for name, module in model.named_modules():
        cls = type(module)
        patched = PATCHED.get(cls)
        if patched is None:
            continue
        if reachable_only and not policy.may_leave_native(resolver.policy, *layer_nk(module)):
            continue
        module.__class__ = patched
        object.__setattr__(module, "_tw_resolver", resolver)
        # x.size -> (kind, plan), filled on first use
        object.__setattr__(module, "_tw_plans", resolver.dispatch_table(*layer_nk(module)))
        layers.append(name)
    return Handle(model, resolver, layers)


def remove(model):
    """Restores every patched layer of `model` to its stock class. Returns how many were restored."""
    restored = 0
    for _, module in model.named_modules():
        stock = _STOCK.get(type(module))
        if stock is None:
            continue
        module.__class__ = stock
        module.__dict__.pop("_tw_resolver", None)
        module.__dict__.pop("_tw_plans", None)
        restored += 1
    return restored


def applied_policy(model):
    """The policy currently applied to `model`, or None."""
    for _, module in model.named_modules():
        r = getattr(module, "__dict__", {}).get("_tw_resolver")
        if r is not None:
            return r.policy
    return None
