"""Sibling fusion: linear layers of one module that read the same input run as one matmul.

On MLX a decode step is bound by per-op host cost, not by GPU time, so computing q, k and v (or gate
and up) as one matmul over the concatenated weights and splitting the output saves two launches per
layer: 169 -> 97 linear calls per token for Qwen2.5-0.5B. The output of each member is a slice of
the fused output, so logits are bit-identical to stock wherever the fused GEMM reduces each output
element in the same order (the correctness gate checks it either way).

Finding siblings (`trace`): one forward pass over two token ids is *built* (never evaluated: MLX is
lazy, so this is Python work only) with every exact `nn.Linear` / `nn.QuantizedLinear` recording the
identity of its input array. Layers that are direct children of the same module and received the same
array are siblings. Nothing is named per architecture; layers of other types (LoRA wrappers, MoE
experts, `SwitchLinear`) are never fused.

What a policy says (`fusion.groups`, schema/policy.schema.json): a group is a `scope` — a module path
where `*` stands for one numeric segment (`model.layers.*.self_attn`) — and its `members`, in the order
their outputs are concatenated. `groups_of(model)` turns a trace into such groups.

Applying a group to one matching module (`Instance`): a fused layer of the members' own class is
built with the concatenated `weight` (and `bias`; for QuantizedLinear also `scales`/`biases`, when
bits, group size and mode agree) and put in the parent under the key `q_proj+k_proj+v_proj`; each
member is replaced by a `FusedSibling` that holds no parameters and returns its slice of the fused
output. The parent's own forward code is untouched. The parameter tree therefore changes shape: its
gradient is taken with respect to the fused weight, which equals the concatenation of the stock
gradients (tests/test_fusion.py). An instance that cannot be fused stays stock and says why
(`Fused.skipped`): a member missing or of another type, members differing in dtype, quantization,
input size, bias or frozen state, or members that did not read the same input in the trace.

Two ways to hold the weights:
- `Fused.on()` / `Fused.off()` with the originals kept (the evaluator's A/B loop switches arms with a
  few dict writes per instance and never concatenates twice);
- `fuse(model, doc)` (the plugin): the original arrays are dropped once the fused copy exists, one
  instance at a time, so steady-state memory equals stock and the peak exceeds it by one instance's
  weights. `unfuse(model)` puts the stock layout back, each member's arrays being exact row slices of
  the fused arrays (bit for bit the originals).

A sibling called with an input other than the one the group last computed still computes correctly:
the group computes the fused product for that input (all members' rows) and returns the slice.
"""

import re

import mlx.core as mx
import mlx.nn as nn

from . import patch

FUSABLE = (nn.Linear, nn.QuantizedLinear)

# Test hook: a deliberately wrong fusion, to prove the correctness gate rejects it. None or
# "rotate_parts" (member i gets member i+1's slice).
_PLANTED_BUG = None
PLANTED_BUGS = (None, "rotate_parts")


def plant_bug(kind):
    """Test only: make every fused group wrong in a known way; None clears it."""
    global _PLANTED_BUG
    if kind not in PLANTED_BUGS:
        raise ValueError(f"unknown planted fusion bug {kind!r}; known: {PLANTED_BUGS}")
    _PLANTED_BUG = kind


# The arrays a fusable layer may hold, in the order they are concatenated (all along axis 0).
_ARRAYS = ("weight", "scales", "biases", "bias")
_DIGITS = re.compile(r"^\d+$")


class FusionError(ValueError):
    """A group cannot be applied to one module; the message is the reason shown to the user."""


# ---------------------------------------------------------------------------------------------
# Finding siblings


def _children(module):
    """(key, child) for the direct fusable children of `module` (exact types only)."""
    return [(k, v) for k, v in module.items() if type(v) in FUSABLE]


class _Tracing:
    """Records, per fusable layer, the identity of every input array it was called with."""

    def __init__(self):
        self.inputs = {}  # id(layer) -> [id(x), ...]
        self.first = {}  # id(layer) -> index of its first call
        self.keep = []  # the inputs themselves, so no id is reused while tracing


def _tracing_call(stock_call, log):
    def call(self, x):
        log.first.setdefault(id(self), len(log.keep))
        log.inputs.setdefault(id(self), []).append(id(x))
        log.keep.append(x)
        return stock_call(self, x)

    return call


def trace(model, tokens=(0, 1)):
    """{parent module name: [[member keys that read the same input], ...]} from one lazily built
    forward pass over `tokens`. Raises whatever the model raises on that input."""
    log = _Tracing()
    classes = {
        cls: type(f"_Trace{cls.__name__}", (cls,), {"__call__": _tracing_call(cls.__call__, log)}) for cls in FUSABLE
    }
    swapped = []
    try:
        for _, module in model.named_modules():
            cls = type(module)
            if cls in classes:
                module.__class__ = classes[cls]
                swapped.append((module, cls))
        model(mx.array([list(tokens)], dtype=mx.int32))  # built, never evaluated
    finally:
        for module, cls in swapped:
            module.__class__ = cls
    found = []
    for name, module in model.named_modules():
        by_input = {}
        for key, child in _children(module):
            calls = log.inputs.get(id(child), [])
            if len(calls) == 1:  # a layer called more than once per pass is left alone
                by_input.setdefault(calls[0], []).append((log.first[id(child)], key))
        for members in by_input.values():
            if len(members) >= 2:
                members.sort()  # members in the order the forward pass calls them
                found.append((members[0][0], name, [k for _, k in members]))
    out = {}
    for _, name, keys in sorted(found):  # groups in forward order
        out.setdefault(name, []).append(keys)
    return out


def _natural(name):
    """Sort key: `layers.2` before `layers.10`."""
    return [(0, int(s), "") if s.isdigit() else (1, 0, s) for s in name.split(".")]


def scope_pattern(name):
    """`model.layers.3.self_attn` -> `model.layers.*.self_attn` (numeric segments become `*`)."""
    return ".".join("*" if _DIGITS.match(s) else s for s in name.split("."))


def scope_matches(pattern, name):
    a, b = pattern.split("."), name.split(".")
    return len(a) == len(b) and all(p == s or (p == "*" and _DIGITS.match(s)) for p, s in zip(a, b))


def layer_nk(layer):
    """(N, K) of a fusable layer (quantized weights pack `32 // bits` values per uint32 along K)."""
    w = layer["weight"]
    bits = getattr(layer, "bits", None)
    return w.shape[0], (w.shape[1] * 32 // bits if bits else w.shape[1])


def groups_of(model, traced=None):
    """The sibling groups of `model` as policy groups, with what the search needs to know of each:
    [{"scope", "members", "n": [N per member], "k", "count"}], in the order the forward pass reaches
    them. Instances are merged into one group per (scope pattern, members) when their member shapes
    agree; `count` is how many modules match."""
    traced = trace(model) if traced is None else traced
    modules = dict(model.named_modules())
    found = {}
    for name, groups in traced.items():
        parent = modules[name]
        for keys in groups:
            ns, ks = zip(*(layer_nk(parent[k]) for k in keys))
            if len(set(ks)) != 1:
                continue
            key = (scope_pattern(name), tuple(keys), ns, ks[0])
            found[key] = found.get(key, 0) + 1
    return [
        {"scope": s, "members": list(m), "n": list(ns), "k": k, "count": c} for (s, m, ns, k), c in found.items()
    ]  # in forward order


# ---------------------------------------------------------------------------------------------
# One fused module


def fused_key(members):
    return "+".join(members)


def _check_members(parent, members, same_input):
    """The members' layers, or FusionError naming why they cannot run as one."""
    layers = []
    for key in members:
        layer = parent.get(key) if isinstance(parent, dict) else None
        if layer is None:
            raise FusionError(f"has no layer {key!r}")
        if type(layer) not in FUSABLE:
            raise FusionError(f"{key} is a {type(layer).__name__}, not a plain Linear or QuantizedLinear")
        layers.append(layer)
    if not same_input:
        raise FusionError("its members did not read the same input in a traced forward pass")
    l0 = layers[0]
    for key, layer in zip(members[1:], layers[1:]):
        if type(layer) is not type(l0):
            raise FusionError(
                f"{members[0]} and {key} differ in quantization ({type(l0).__name__} vs {type(layer).__name__})"
            )
        if layer["weight"].dtype != l0["weight"].dtype:
            raise FusionError(
                f"{members[0]} and {key} differ in dtype ({l0['weight'].dtype} vs {layer['weight'].dtype})"
            )
        if isinstance(l0, nn.QuantizedLinear):
            a = (l0.bits, l0.group_size, l0.mode, "biases" in l0)
            b = (layer.bits, layer.group_size, layer.mode, "biases" in layer)
            if a != b:
                raise FusionError(
                    f"{members[0]} and {key} differ in quantization (bits, group size, mode: {a[:3]} vs {b[:3]})"
                )
        if layer_nk(layer)[1] != layer_nk(l0)[1]:
            raise FusionError(
                f"{members[0]} and {key} differ in input size ({layer_nk(l0)[1]} vs {layer_nk(layer)[1]})"
            )
        if ("bias" in layer) != ("bias" in l0):
            raise FusionError(f"{members[0]} and {key} differ in bias (one has none)")
        if layer._no_grad != l0._no_grad:
            raise FusionError(f"{members[0]} and {key} differ in which parameters are frozen")
    return layers


def _fused_layer(layers):
    """A layer of the members' class whose arrays are the members' concatenated along the outputs."""
    l0 = layers[0]
    n = sum(layer_nk(layer)[0] for layer in layers)
    k = layer_nk(l0)[1]
    if type(l0) is nn.Linear:
        fused = nn.Linear(k, n, bias="bias" in l0)
    else:
        fused = nn.QuantizedLinear(k, n, bias="bias" in l0, group_size=l0.group_size, bits=l0.bits, mode=l0.mode)
    for name in _ARRAYS:
        if name in l0:
            fused[name] = mx.concatenate([layer[name] for layer in layers], axis=0)
        else:
            fused.pop(name, None)
    fused._no_grad = set(l0._no_grad)
    fused._training = l0._training
    mx.eval(fused.parameters())
    return fused


class FusedSibling(nn.Module):
    """Stands in for one member of a fused group: its output is its slice of the group's output.
    Holds no parameters (the weights live in the fused layer beside it)."""

    def __init__(self, instance, index, training):
        super().__init__()
        self._training = training  # model.train()/eval() reach it from then on (it is in the tree)
        object.__setattr__(self, "_tw_instance", instance)
        object.__setattr__(self, "_tw_index", index)

    def __call__(self, x):
        return self._tw_instance.output(self._tw_index, x, self._training)

    def _extra_repr(self):
        inst = self._tw_instance
        return f"slice {self._tw_index} of {inst.key}"


class Instance:
    """One group applied to one module: the fused layer, the members' stand-ins and the originals."""

    def __init__(self, parent, name, members, layers, fuse_training=True):
        self.parent = parent
        self.name = name
        self.members = tuple(members)
        self.key = fused_key(members)
        self.originals = list(layers)
        self.fused = _fused_layer(layers)
        rows = [layer_nk(layer)[0] for layer in layers]
        self.offsets = [sum(rows[: i + 1]) for i in range(len(rows) - 1)]
        self.rows = rows
        self.siblings = [FusedSibling(self, i, layer._training) for i, layer in enumerate(layers)]
        self.fuse_training = fuse_training
        self.released = False
        self._x = None
        self._parts = None
        self._taken = 0
        self._all = (1 << len(members)) - 1

    # The hot path: the first member called with x computes the fused product and splits it; the
    # others take their slice. Once every member has taken its part the cache is dropped, so no
    # activation outlives the forward pass that made it.
    def output(self, i, x, training):
        if training and not self.fuse_training:
            return self._member_alone(i, x)
        bit = 1 << i
        if x is not self._x or self._taken & bit:
            y = self.parent[self.key](x)
            self._parts = mx.split(y, self.offsets, axis=-1)
            self._x = x
            self._taken = 0
        part = self._parts[(i + 1) % len(self._parts) if _PLANTED_BUG == "rotate_parts" else i]
        self._taken |= bit
        if self._taken == self._all:
            self._x = self._parts = None
        return part

    def _member_alone(self, i, x):
        """Member i's own matmul over its rows of the fused arrays (training with an
        inference-only fusion: gradients still reach the fused weight through the slices)."""
        fused = self.parent[self.key]
        lo = sum(self.rows[:i])
        hi = lo + self.rows[i]
        if isinstance(fused, nn.QuantizedLinear):
            y = mx.quantized_matmul(
                x,
                fused["weight"][lo:hi],
                scales=fused["scales"][lo:hi],
                biases=fused["biases"][lo:hi] if "biases" in fused else None,
                transpose=True,
                group_size=fused.group_size,
                bits=fused.bits,
                mode=fused.mode,
            )
            return y + fused["bias"][lo:hi] if "bias" in fused else y
        w = fused["weight"][lo:hi]
        if "bias" in fused:
            return mx.addmm(fused["bias"][lo:hi], x, w.T)
        return x @ w.T

    def on(self):
        self.parent[self.key] = self.fused
        for key, sibling in zip(self.members, self.siblings):
            self.parent[key] = sibling

    def off(self):
        self.parent.pop(self.key, None)
        for key, layer in zip(self.members, self.originals):
            self.parent[key] = layer
        self._x = self._parts = None

    def release(self):
        """Drops the originals' arrays (the plugin's steady state); `restore` rebuilds them."""
        for layer in self.originals:
            for name in _ARRAYS:
                layer.pop(name, None)
        self.fused = None  # the parent holds it
        self.released = True

    def restore(self):
        """Puts the stock layout back from the fused arrays (exact row slices)."""
        fused = self.parent[self.key]
        lo = 0
        for layer, rows in zip(self.originals, self.rows):
            for name in _ARRAYS:
                if name in fused:
                    layer[name] = fused[name][lo : lo + rows]
            lo += rows
        mx.eval([layer.parameters() for layer in self.originals])
        self.off()
        self.released = False


# ---------------------------------------------------------------------------------------------
# A policy's fusion applied to a model


class Fused:
    """The fusion of one policy on one model: `instances` applied, `skipped` [(module, members,
    reason)]. Built by `prepare`; `on()`/`off()` switch every instance."""

    def __init__(self, model, instances, skipped, groups):
        self.model = model
        self.instances = instances
        self.skipped = skipped
        self.groups = groups
        self.active = False

    def on(self):
        for inst in self.instances:
            inst.on()
        self.active = True

    def doc(self):
        """The fusion part of the policy this was prepared from (to fuse again, e.g. after a load)."""
        fusion = {"groups": list(self.groups)}
        if self.instances and not self.instances[0].fuse_training:
            fusion["training"] = False
        return {"fusion": fusion}

    def off(self):
        for inst in self.instances:
            inst.off()
        self.active = False

    def to_stock(self, flat):
        """A flattened parameter (or gradient) dict of the fused model -> the stock layout's names:
        each fused array is cut into its members' rows. Other entries pass through."""
        out = dict(flat)
        for inst in self.instances:
            for name in _ARRAYS:
                fused_name = f"{inst.name}.{inst.key}.{name}" if inst.name else f"{inst.key}.{name}"
                if fused_name not in out:
                    continue
                whole = out.pop(fused_name)
                lo = 0
                for member, rows in zip(inst.members, inst.rows):
                    out[f"{inst.name}.{member}.{name}" if inst.name else f"{member}.{name}"] = whole[lo : lo + rows]
                    lo += rows
        return out

    def calls_saved(self):
        """Linear calls one forward pass saves (members - 1 per instance)."""
        return sum(len(inst.members) - 1 for inst in self.instances)

    def report(self):
        """What the evaluator and the plugin's status say about this fusion."""
        return {
            "instances": len(self.instances),
            "calls_saved_per_forward": self.calls_saved(),
            "summary": self.summary(),
            "skipped": [{"module": m, "members": list(g), "reason": r} for m, g, r in self.skipped],
        }

    def summary(self):
        """Short words: `q/k/v fused in 24 modules, gate/up fused in 24 modules`."""
        per = {}
        for inst in self.instances:
            per[inst.members] = per.get(inst.members, 0) + 1
        return ", ".join(f"{describe_members(m)} fused in {c} module{'s' if c != 1 else ''}" for m, c in per.items())


def describe_members(members):
    """[`q_proj`, `k_proj`, `v_proj`] -> `q/k/v`; other names are joined as they are."""
    shared = None
    for suffix in ("_proj", "_linear", "_dense"):
        if all(m.endswith(suffix) for m in members):
            shared = suffix
            break
    names = [m[: -len(shared)] if shared else m for m in members]
    return "/".join(names)


def policy_groups(doc):
    """The policy's fusion groups ([] when it has none) and whether they apply while training."""
    fusion = (doc or {}).get("fusion") or {}
    return list(fusion.get("groups") or []), fusion.get("training", True)


def prepare(model, doc, traced=None, release=False):
    """Builds every instance the policy's groups name in `model`. Modules where a group cannot apply
    are listed in `skipped` with the reason; a group that matches no module at all is listed too.
    Traces the model once when the policy has groups.

    `release=False` (the evaluator): originals kept, nothing switched on yet. `release=True` (the
    plugin): each instance is switched on and its originals' arrays dropped before the next is built,
    so the peak is stock plus one instance's weights."""
    groups, fuse_training = policy_groups(doc)
    if not groups:
        return Fused(model, [], [], [])
    if traced is None:
        try:
            traced = trace(model)
        except Exception as e:  # a model that cannot be traced is left stock
            reason = f"could not trace the model ({type(e).__name__}: {e})"
            return Fused(model, [], [(g["scope"], tuple(g["members"]), reason) for g in groups], groups)
    modules = sorted(model.named_modules(), key=lambda nm: _natural(nm[0]))
    instances, skipped, taken = [], [], set()
    for g in groups:
        members = tuple(g["members"])
        matched = 0
        for name, module in modules:
            if not scope_matches(g["scope"], name):
                continue
            matched += 1
            same_input = any(set(members) <= set(keys) for keys in traced.get(name, []))
            try:
                clash = [m for m in members if (name, m) in taken]
                if clash:
                    raise FusionError(f"{clash[0]} is already fused by another group")
                layers = _check_members(module, members, same_input)
            except FusionError as e:
                skipped.append((name, members, str(e)))
                continue
            taken.update((name, m) for m in members)
            inst = Instance(module, name, members, layers, fuse_training)
            if release:
                inst.on()
                inst.release()
            instances.append(inst)
        if matched == 0:
            skipped.append((g["scope"], members, "no module of the model matches this scope"))
    fused = Fused(model, instances, skipped, groups)
    fused.active = release and bool(instances)
    return fused


def fuse(model, doc, traced=None):
    """The plugin's fusion: applies the policy's groups and drops the original arrays (see
    `prepare(release=True)`). Returns the `Fused`, also kept on the model for `unfuse`. A model already
    fused is unfused first."""
    unfuse(model)
    fused = prepare(model, doc, traced, release=True)
    if fused.instances:
        object.__setattr__(model, "_tw_fusion", fused)
    return fused


def fused_of(model):
    """The plugin's `Fused` on `model`, or None."""
    return getattr(model, "__dict__", {}).get("_tw_fusion")


def unfuse(model):
    """Restores the stock layout of a model fused by `fuse` (bit for bit). Returns how many
    instances were restored (0 when the model was not fused)."""
    fused = fused_of(model)
    if fused is None:
        return 0
    for inst in fused.instances:
        inst.restore()
    model.__dict__.pop("_tw_fusion", None)
    return len(fused.instances)


def count_linear_calls(model, tokens=(0, 1)):
    """Linear matmuls one forward pass over `tokens` runs (plain and quantized layers, fused ones
    included, and a tied head's `as_linear`), built lazily and never evaluated: for tests and words."""
    calls = [0]
    originals = {}

    def counting(f):
        def call(self, *a, **k):
            calls[0] += 1
            return f(self, *a, **k)

        return call

    targets = [
        (c, "__call__") for c in (nn.Linear, nn.QuantizedLinear, *[p for b, p in patch.PATCHED.items() if b in FUSABLE])
    ]
    targets += [(c, "as_linear") for c in (nn.Embedding, nn.QuantizedEmbedding)]
    targets += [(p, "as_linear") for b, p in patch.PATCHED.items() if b in (nn.Embedding, nn.QuantizedEmbedding)]
    targets += [(Instance, "_member_alone")]
    try:
        for cls, attr in targets:
            originals[(cls, attr)] = cls.__dict__.get(attr)
            setattr(cls, attr, counting(getattr(cls, attr)))
        model(mx.array([list(tokens)], dtype=mx.int32))
    finally:
        for (cls, attr), f in originals.items():
            if f is None:
                delattr(cls, attr)
            else:
                setattr(cls, attr, f)
    return calls[0]
