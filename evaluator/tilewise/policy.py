"""The policy `tilewise.policy/1`: load, validate, hash, and pick the plan for one matmul.

The JSON Schema in `schema/policy.schema.json` is the one definition, shared with the Rust daemon
(`daemon/src/policy.rs`). Validation runs the schema first, then the cross-field checks listed in
`docs/policy.md`, with the same field paths (`matmul.rules[0].plan.tile_m`) and message texts as the
Rust side, so a policy refused by one language is refused by the other for the same reason.

A policy stays a plain dict (JSON data); nothing here executes anything from it.
"""

import copy
import hashlib
import json
from functools import lru_cache
from pathlib import Path

SCHEMA_ID = "tilewise.policy/1"
# Largest M a GEMV kernel plan may serve (decode and small batches); equal to Rust's GEMV_MAX_M.
GEMV_MAX_M = 16
PLAN_KINDS = ("native", "split", "kernel")

_PACKAGE_DATA = Path(__file__).resolve().parent / "data"
# In a source checkout the package sits at evaluator/tilewise; the shared schema at schema/.
_REPO_SCHEMA_DIR = Path(__file__).resolve().parent.parent.parent / "schema"


def schema_path(name="policy.schema.json"):
    """The repo's shared file when running from a source checkout, else the packaged copy.

    The packaged copy (tilewise/data/) exists for wheel installs; tests/test_policy.py asserts it is
    byte-identical to the repo file so the two can never drift unnoticed.
    """
    repo = _REPO_SCHEMA_DIR / name
    return repo if repo.is_file() else _PACKAGE_DATA / name


@lru_cache(maxsize=1)
def schema():
    return json.loads(schema_path().read_text(encoding="utf-8"))


@lru_cache(maxsize=1)
def _validator():
    import jsonschema

    cls = jsonschema.validators.validator_for(schema())
    cls.check_schema(schema())
    return cls(schema())


class PolicyError(ValueError):
    """Why a policy was refused: every problem found, each as (path, message)."""

    def __init__(self, errors):
        self.errors = list(errors)
        super().__init__("invalid policy: " + "; ".join(f"{p}: {m}" for p, m in self.errors))


def _dotted(path):
    """['matmul', 'rules', 0, 'plan'] -> 'matmul.rules[0].plan' (the Rust side's style)."""
    out = ""
    for seg in path:
        if isinstance(seg, int):
            out += f"[{seg}]"
        else:
            out += ("." if out else "") + str(seg)
    return out or "(root)"


def _schema_errors(doc):
    """Schema violations as (path, message).

    A plan is a `oneOf` over kinds; jsonschema reports that as one error at the plan. When the
    document names a known kind we report the errors of that kind's branch instead, so the path
    points at the offending field (`...plan.tile_m`) rather than at the whole plan.
    """
    out = []
    for err in _validator().iter_errors(doc):
        if err.validator == "oneOf" and err.context and isinstance(err.instance, dict):
            branches = {}
            for sub in err.context:
                branches.setdefault(sub.schema_path[0], []).append(sub)
            matching = [
                errs for errs in branches.values() if not any(list(e.relative_path)[:1] == ["kind"] for e in errs)
            ]
            kind = err.instance.get("kind")
            if kind in PLAN_KINDS and len(matching) == 1:
                for sub in matching[0]:
                    out.append((_dotted(sub.absolute_path), sub.message))
                continue
            if kind not in PLAN_KINDS:
                out.append(
                    (
                        _dotted(err.absolute_path),
                        f"unknown plan kind {kind!r} (expected one of {', '.join(PLAN_KINDS)})",
                    )
                )
                continue
        out.append((_dotted(err.absolute_path), err.message))
    return out


def _semantic_errors(doc, machine_backend=None):
    """The cross-field checks of docs/policy.md (same paths and messages as policy.rs)."""
    errors = []
    target_backend = doc["target"]["backend"]
    if machine_backend is not None and target_backend not in ("*", machine_backend):
        errors.append(("target.backend", f"policy is for {target_backend}, this machine runs {machine_backend}"))

    def check_plan(path, plan, m_hi):
        if plan.get("kind") != "kernel":
            return
        kb = plan["backend"]
        want = machine_backend if machine_backend is not None else target_backend
        if want != "*" and kb != want:
            errors.append((f"{path}.backend", f"kernel backend {kb} not available on {want}"))
        if plan["family"] == "gemv":
            if plan.get("rows_per_block") is None:
                errors.append((f"{path}.rows_per_block", "gemv needs rows_per_block"))
            if m_hi is None or m_hi > GEMV_MAX_M:
                errors.append(
                    (
                        path,
                        f"gemv serves only M <= {GEMV_MAX_M}: put it in a rule whose m range "
                        f"ends at or below {GEMV_MAX_M}",
                    )
                )
        else:
            for name in ("block_m", "block_n", "block_k", "warps"):
                if plan.get(name) is None:
                    errors.append((f"{path}.{name}", f"gemm needs {name}"))

    for i, rule in enumerate(doc["matmul"]["rules"]):
        for axis in ("m", "n", "k"):
            r = rule.get(axis)
            if r is not None and r[1] is not None and r[0] > r[1]:
                errors.append((f"matmul.rules[{i}].{axis}", f"lo > hi ({r[0]} > {r[1]})"))
        m_hi = rule["m"][1] if rule.get("m") is not None else None
        check_plan(f"matmul.rules[{i}].plan", rule["plan"], m_hi)
    check_plan("matmul.default", doc["matmul"]["default"], None)
    errors.extend(_fusion_errors(doc))
    return errors


def scopes_overlap(a, b):
    """Whether two fusion scopes can match the same module path (`*` = one numeric segment)."""
    sa, sb = a.split("."), b.split(".")

    def seg_ok(x, y):
        if x == y:
            return True
        if x == "*":
            return y.isdigit()
        if y == "*":
            return x.isdigit()
        return False

    return len(sa) == len(sb) and all(seg_ok(x, y) for x, y in zip(sa, sb))


def _fusion_errors(doc):
    """A layer may belong to one fusion group only (same paths and messages as policy.rs)."""
    errors = []
    groups = (doc.get("fusion") or {}).get("groups") or []
    for j, g in enumerate(groups):
        for i in range(j):
            h = groups[i]
            if not scopes_overlap(h["scope"], g["scope"]):
                continue
            shared = [m for m in g["members"] if m in h["members"]]
            if shared:
                errors.append(
                    (
                        f"fusion.groups[{j}].members",
                        f"{shared[0]} is already in fusion.groups[{i}] (a layer joins one group)",
                    )
                )
    return errors


def validate(doc):
    """Full validation (schema, then cross-field checks). Returns `doc`; raises PolicyError."""
    if not isinstance(doc, dict):
        raise PolicyError([("(root)", f"a policy is a JSON object, not {type(doc).__name__}")])
    errors = _schema_errors(doc)
    if errors:
        raise PolicyError(errors)
    errors = _semantic_errors(doc)
    if errors:
        raise PolicyError(errors)
    return doc


def validate_for_backend(doc, backend):
    """Checks that a valid policy can run on a machine whose MLX backend is `backend`
    (a kernel plan for another backend is refused here, not at run time)."""
    validate(doc)
    errors = _semantic_errors(doc, machine_backend=backend)
    if errors:
        raise PolicyError(errors)
    return doc


def loads(text):
    """Parses and validates a policy from JSON text."""
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise PolicyError([("(root)", f"not JSON: {e}")]) from None
    return validate(doc)


def load(path):
    """Parses and validates a policy file."""
    return loads(Path(path).read_text(encoding="utf-8"))


def native():
    """The built-in native policy (a fresh copy; callers may modify it)."""
    return copy.deepcopy(_native())


@lru_cache(maxsize=1)
def _native():
    return load(schema_path("native.policy.json"))


def canonical_json(doc):
    """Keys sorted, no whitespace, UTF-8 without escaping: the bytes the content hash covers."""
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def content_hash(doc):
    """`sha256:<hex>` of the canonical JSON; equal to the Rust daemon's hash of the same document."""
    return "sha256:" + hashlib.sha256(canonical_json(doc).encode("utf-8")).hexdigest()


def _in_range(r, v):
    return r is None or (v >= r[0] and (r[1] is None or v <= r[1]))


def plan_for(doc, m, n, k):
    """The plan for one (M, N, K) matmul: the first matching rule, else the default."""
    for rule in doc["matmul"]["rules"]:
        if _in_range(rule.get("m"), m) and _in_range(rule.get("n"), n) and _in_range(rule.get("k"), k):
            return rule["plan"]
    return doc["matmul"]["default"]


def may_leave_native(doc, n, k):
    """Whether some M gives a layer of shape (N, K) a non-native plan under `doc`. Scans the rules
    matching (N, K) in order (first match wins): a non-native plan says yes; a native rule covering
    every M ends the scan with no; otherwise the default decides. Layers for which this is False can
    be left unpatched (stock), which is what the plugin and the evaluator's timing do."""
    for rule in doc["matmul"]["rules"]:
        if not (_in_range(rule.get("n"), n) and _in_range(rule.get("k"), k)):
            continue
        if rule["plan"]["kind"] != "native":
            return True
        m = rule.get("m")
        if m is None or (m[0] <= 1 and m[1] is None):
            return False
    return doc["matmul"]["default"]["kind"] != "native"


def is_all_native(doc):
    """True when every matmul runs native (no plan changes anything; fusion aside)."""
    return doc["matmul"]["default"]["kind"] == "native" and all(
        r["plan"]["kind"] == "native" for r in doc["matmul"]["rules"]
    )


def fusion_groups(doc):
    """The policy's fusion groups ([] when it fuses nothing)."""
    return list((doc.get("fusion") or {}).get("groups") or [])


def is_stock(doc):
    """True when the policy changes nothing: every plan native and no fusion."""
    return is_all_native(doc) and not fusion_groups(doc)


def make_policy(rules=(), default=None, *, name=None, target=None, generation=None, fusion=None):
    """Builds (and validates) a policy document; for tests, benchmarks and `tabulate`."""
    doc = {
        "schema": SCHEMA_ID,
        "target": dict(target or {"device": "*", "model": "*", "mlx": "*", "backend": "*"}),
        "matmul": {"rules": list(rules), "default": default or {"kind": "native"}},
    }
    if name is not None:
        doc["name"] = name
    if generation is not None:
        doc["generation"] = generation
    if fusion is not None:
        doc["fusion"] = fusion
    return validate(doc)


def split_plan(tile_m=None, tile_n=None, tile_k=None):
    return {"kind": "split", "tile_m": tile_m, "tile_n": tile_n, "tile_k": tile_k}
