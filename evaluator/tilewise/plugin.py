"""The mlx_lm plugin: one call makes every model this process loads run the best *proven* policy.

    import tilewise
    tilewise.enable_optimizations()            # ask the daemon (the normal case)
    model, tokenizer = mlx_lm.load(...)        # the policy is applied here
    print(tilewise.status())                   # what is applied, and why

Models that do not come through ``mlx_lm.load`` (``mlx_lm.utils.load_model``, ``sharded_load``,
models built in code) get it with ``tilewise.apply_to(model)`` or ``enable_optimizations(model=...)``.
A policy's ``generation.prefill_step_size`` becomes ``mlx_lm.generate.generate_step``'s default for
its model (an explicit argument — including the mlx_lm CLI's own ``--prefill-step-size`` default —
wins).

Where the policy comes from (`source`):

- ``None``: the daemon, over its local socket (docs/protocol.md: ``hello``, ``status`` for the
  daemon's device fingerprint, ``policy.get`` for this model fingerprint, MLX version and backend),
  all within one short deadline (:data:`DEFAULT_TIMEOUT_S`). Every answer is cached on disk (the
  cache mirrors the daemon's *last* answer, native included). When the daemon is absent, slow or
  broken, the cached answer is used while it is valid, else native.
- a path to a policy JSON file, or to an OpenEvolve ``best_program.py`` (a trusted local file the user
  named) whose ``choose_tile_size`` is tabulated over the loaded model's shapes into a policy by the
  evaluator's tabulate code (run in a separate process with a time limit).

What is refused (and replaced by native, with the reason in :func:`status`): a policy that fails the
schema or the cross-field checks, one whose content hash differs from what the daemon said, one that
targets another device, model, MLX version or backend (``*`` matches anything), one with kernel plans
for a backend this process does not run.

"Native" means the model is left exactly as stock (no layer is patched), so a fallback can never
cost anything. A policy in force that is all-native is not patched in either, for the same reason,
and of any other policy only the layers whose (N, K) some M routes to a non-native plan are patched
(tilewise.patch's dispatch costs about a microsecond of Python per call).

The cache (``<cache dir>/policies/<key>.json``; the cache dir is ``$TILEWISE_HOME/cache``, else
``$XDG_CACHE_HOME/tilewise`` or ``~/Library/Caches/tilewise``; key = model fingerprint, MLX version,
backend) holds
the policy, its hash, the daemon's device fingerprint, a host key of this machine and the fetch time.
It is used only while it is at most :data:`DEFAULT_CACHE_MAX_AGE_S` old (7 days; env
``TILEWISE_POLICY_CACHE_MAX_AGE_S`` overrides), written on this same host, and its policy still passes
every check above against the cached device fingerprint. Seven days, because a policy proven for an
exact (device, model, MLX version) stays correct as long as those do — which the key and target
already pin — while the age limit bounds how long a policy the daemon has since replaced can outlive
it on a machine whose daemon stopped running.

Nothing here ever raises into the user's program: every failure becomes native plus ONE warning per
process (:class:`TilewiseWarning`); later problems are logged at INFO level and all are in status().
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import importlib
import json
import logging
import os
import platform
import sys
import time
import warnings
import weakref
from pathlib import Path
from typing import Any, Optional

import mlx.core as mx
import mlx_lm
import mlx_lm.utils as mlx_lm_utils
from mlx.utils import tree_flatten

from . import backend, fusion, models, patch, policy, tabulate, usage
from .daemon_client import DEFAULT_TIMEOUT_S, DaemonClient, DaemonError, DaemonUnavailable, cache_dir

log = logging.getLogger("tilewise.plugin")

DEFAULT_CACHE_MAX_AGE_S = 7 * 24 * 3600
CACHE_FORMAT = "tilewise.policy-cache/1"
DEVICE_FILE_FORMAT = "tilewise.device-cache/1"
#: Values of :attr:`ModelRecord.source`.
SOURCES = ("daemon", "cache", "file", "native")


class TilewiseWarning(UserWarning):
    """The plugin fell back to native (or to a cached policy); the message says why."""


@dataclasses.dataclass
class ModelRecord:
    """What was done to one model and why."""

    model_fingerprint: Optional[str]
    #: "daemon" | "cache" | "file" | "native"
    source: str
    #: Human-readable explanation (why this policy, or why native).
    reason: str
    policy_hash: Optional[str] = None
    policy_name: Optional[str] = None
    target: Optional[dict] = None
    #: How many layers were patched (0 when native: the model is left stock).
    patched_layers: int = 0
    #: Evidence the daemon sent with a proven policy (ratio, lo, hi, session_id, promoted_at).
    evidence: Optional[dict] = None
    fetched_at: Optional[str] = None
    #: The policy's generation.prefill_step_size, made generate_step's default for this model.
    prefill_step_size: Optional[int] = None
    #: What the policy's fusion did to the model (fusion.Fused.report plus linear calls per token
    #: before/after), None when it fuses nothing.
    fusion: Optional[dict] = None

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class Status:
    """Returned by :func:`status`: printable (``print(tilewise.status())``) or as a dict."""

    enabled: bool
    #: "daemon" or the policy/program path the user named.
    requested: Optional[str]
    models: list
    #: Matmul calls per plan kind since this process started (all patched models together).
    calls: dict
    warning: Optional[str]

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["models"] = [m.as_dict() if hasattr(m, "as_dict") else m for m in self.models]
        return d

    def __str__(self) -> str:
        if not self.enabled and not self.models:
            return "tilewise: not enabled (call tilewise.enable_optimizations())"
        asked = "the daemon" if self.requested == "daemon" else self.requested
        lines = [f"tilewise: {'enabled' if self.enabled else 'disabled'}, policies from {asked}"]
        if not self.models:
            lines.append("  no model loaded since enabling")
        for m in self.models:
            if m.policy_hash:
                t = m.target or {}
                what = (
                    f"policy {m.policy_hash[:19]}… ({m.policy_name or 'unnamed'}) for device "
                    f"{t.get('device')}, mlx {t.get('mlx')}, {t.get('backend')}"
                )
                what = f"from {m.source}: {what}"
            else:
                what = "native (model left stock)"
            lines.append(f"  model {m.model_fingerprint}: {what}; {_layers(m.patched_layers)} patched")
            if m.fusion and m.fusion.get("unfused_for"):
                lines.append(f"    fusion undone for {m.fusion['unfused_for']}: stock layout")
            elif m.fusion:
                if m.fusion["instances"]:
                    lines.append(f"    fused: {describe_fusion(m.fusion)}")
                for skip in m.fusion.get("skipped") or []:
                    lines.append(f"    not fused: {skip['module']} {'/'.join(skip['members'])}: {skip['reason']}")
            if m.evidence:
                lines.append(f"    measured: {describe_evidence(m.evidence)}")
            lines.append(f"    why: {m.reason}")
        lines.append("  matmul calls so far: " + ", ".join(f"{k} {v}" for k, v in self.calls.items()))
        if self.warning:
            lines.append(f"  warning: {self.warning}")
        return "\n".join(lines)


def _layers(n: int) -> str:
    return f"{n} layer" if n == 1 else f"{n} layers"


def describe_fusion(report: dict) -> str:
    """`q/k/v fused in 24 modules, gate/up fused in 24 modules: 169 → 97 matmuls per token`."""
    text = report.get("summary") or "nothing"
    calls = report.get("matmuls_per_token")
    if calls and calls[0] != calls[1]:
        text += f": {calls[0]} → {calls[1]} matmuls per token"
    return text


def _pct(ratio, lo=None, hi=None) -> str:
    text = f"{(ratio - 1) * 100:+.1f} %"
    if lo is not None and hi is not None:
        text += f" [{(lo - 1) * 100:.1f}, {(hi - 1) * 100:.1f}]"
    return text


def describe_evidence(evidence: dict) -> str:
    """The daemon's evidence in words: `+3.4 % [0.8, 4.9] combined (inference +4.5 % [...], ...)`."""
    text = f"{_pct(evidence['ratio'], evidence.get('lo'), evidence.get('hi'))} combined"
    parts = []
    for name, w in ((evidence.get("summary") or {}).get("workloads") or {}).items():
        if isinstance(w, dict) and isinstance(w.get("ratio"), (int, float)):
            parts.append(f"{name} {_pct(w['ratio'], w.get('lo'), w.get('hi'))}")
    return text + (f" ({', '.join(parts)})" if parts else "")


class _PluginState:
    """Process-wide plugin state (one per process, like the patched mlx_lm.load)."""

    def __init__(self):
        self.enabled = False
        self.source: Optional[str] = None
        self.timeout = DEFAULT_TIMEOUT_S
        self.announce = False
        self.records: list = []
        # model id -> weakref, so disable() can unpatch what we patched without keeping models alive
        self.patched: dict = {}
        # model id -> (weakref, prefill_step_size) of policies that set generation.prefill_step_size
        self.prefill: dict = {}
        # model id -> its latest ModelRecord (while the model is patched or fused)
        self.record_of: dict = {}
        self.warning: Optional[str] = None


_state = _PluginState()


# ---------------------------------------------------------------------------------------------
# Public API


def enable_optimizations(source=None, *, model=None, timeout: Optional[float] = None, announce: bool = False):
    """Applies the best proven policy to every model loaded from now on by ``mlx_lm.load``
    (and to ``model`` now, when given). Returns :func:`status`. Never raises on a missing daemon or
    a bad policy: those fall back to native with one warning.

    ``source``: None (ask the daemon), or a path to a policy JSON or an OpenEvolve ``best_program.py``.
    ``timeout``: seconds for connect + handshake + reply from the daemon (default: env
    ``TILEWISE_PLUGIN_TIMEOUT_S``, else :data:`DEFAULT_TIMEOUT_S`).
    ``announce``: print one status line per applied model on stderr (the CLI wrapper uses it).
    """
    _state.enabled = True
    _state.source = None if source is None else os.fspath(source)
    _state.timeout = float(timeout) if timeout is not None else default_timeout_s()
    _state.announce = announce
    _install_load_hook()
    if model is not None:
        apply_to(model)
    return status()


def apply_to(model, source=..., *, name: Optional[str] = None):
    """Resolves and applies the policy for an already loaded ``model``; returns its ModelRecord.
    ``source`` defaults to the one given to enable_optimizations (else the daemon). ``name``: how
    the model was loaded (a path or Hugging Face id), which the daemon shows in ``tilewise models``
    (the load hook passes it)."""
    src = _state.source if source is ... else (None if source is None else os.fspath(source))
    try:
        record = _apply(model, src, name)
    except Exception as e:  # the plugin must never break the user's program
        try:
            _unpatch(model)
        except Exception:
            pass
        record = ModelRecord(None, "native", f"tilewise failed, model left stock: {type(e).__name__}: {e}")
        _warn(record.reason)
    _state.records.append(record)
    if id(model) in _state.patched:
        _state.record_of[id(model)] = record
    if _state.announce:
        why = "see the warning above" if record.reason == _state.warning else record.reason
        fused = f"; fused: {describe_fusion(record.fusion)}" if record.fusion and record.fusion["instances"] else ""
        print(
            f"tilewise: {record.source}, policy {record.policy_hash or 'native'}, "
            f"{_layers(record.patched_layers)} patched{fused} — {why}",
            file=sys.stderr,
            flush=True,
        )
    return record


def status() -> Status:
    return Status(
        enabled=_state.enabled,
        requested=(_state.source or "daemon") if _state.enabled or _state.records else None,
        models=list(_state.records),
        calls=patch.call_counts(),
        warning=_state.warning,
    )


def disable() -> None:
    """Restores ``mlx_lm.load`` and unpatches every model this plugin patched (that is still alive)."""
    _uninstall_load_hook()
    usage.unwatch_all()
    for ref in list(_state.patched.values()):
        m = ref()
        if m is not None:
            _unpatch(m)
    _state.patched.clear()
    _state.prefill.clear()
    _state.record_of.clear()
    _state.enabled = False


def _reset_for_tests() -> None:
    """Forget records and the once-per-process warning flag (tests only)."""
    disable()
    _state.records.clear()
    _state.warning = None
    _state.source = None


# ---------------------------------------------------------------------------------------------
# Resolution: which policy for this model, from where, and why


@dataclasses.dataclass
class _Resolved:
    policy: Optional[dict]  # None = native (leave stock)
    source: str
    reason: str
    device: Optional[str] = None
    evidence: Optional[dict] = None
    fetched_at: Optional[str] = None
    warn: bool = False


class Refused(ValueError):
    """A policy failed a check; the message is the reason shown to the user."""


def this_target(model) -> dict:
    """(model fingerprint, MLX version, backend) of this process and model; device comes from the daemon."""
    return {"device": None, "model": models.fingerprint(model), "mlx": mx.__version__, "backend": backend.backend()}


def check_policy(doc: Any, want: dict, expected_hash: Optional[str] = None) -> str:
    """Validates ``doc`` for target ``want`` and returns its content hash; raises Refused(reason).

    ``want["device"]`` None means this machine's device fingerprint is unknown: then only a policy
    for any device (``*``) passes, because an unverified device-specific policy is not proven here.
    """
    try:
        policy.validate_for_backend(doc, want["backend"])
    except policy.PolicyError as e:
        raise Refused(str(e)) from None
    digest = policy.content_hash(doc)
    if expected_hash is not None and digest != expected_hash:
        raise Refused(f"content hash {digest} differs from the announced {expected_hash}")
    target = doc["target"]
    for field in ("device", "model", "mlx", "backend"):
        have = target[field]
        if have == "*":
            continue
        if want[field] is None:
            raise Refused(
                f"policy targets {field} {have}, and this machine's {field} fingerprint is unknown "
                f"(the daemon is not reachable and has never been)"
            )
        if have != want[field]:
            raise Refused(f"policy targets {field} {have}, this is {want[field]}")
    return digest


def _apply(model, src: Optional[str], name: Optional[str] = None) -> ModelRecord:
    _unpatch(model)  # a re-applied model starts from stock (its fingerprint is the stock layout's)
    want = this_target(model)
    if src is None:
        r = _from_daemon(want, _state.timeout, name=name, weights=models.weights_label(model))
    else:
        r = _from_file(Path(src), model, want)
    # What this process runs with the model goes to the daemon (tilewise.usage: sizes and counts only).
    try:
        usage.watch(model, want["model"], name, models.model_shapes(model))
    except Exception as e:  # usage is a view for the daemon: never worth a policy
        log.info("usage of %s not recorded: %s: %s", want["model"], type(e).__name__, e)
    if r.warn:
        _warn(r.reason)
    rec = ModelRecord(want["model"], r.source, r.reason, evidence=r.evidence, fetched_at=r.fetched_at)
    if r.policy is None:
        return rec
    rec.policy_hash = policy.content_hash(r.policy)
    rec.policy_name = r.policy.get("name")
    rec.target = dict(r.policy["target"])
    step = (r.policy.get("generation") or {}).get("prefill_step_size")
    if step is not None:
        # generate_step's default for this model (a caller's explicit prefill_step_size wins)
        _state.prefill[id(model)] = (weakref.ref(model), step)
        rec.prefill_step_size = step
    if policy.is_stock(r.policy):
        rec.reason += "; all plans native, model left stock"
        return rec
    if policy.fusion_groups(r.policy):
        rec.fusion = _fuse(model, r.policy)
    rec.patched_layers = _patch_reachable_layers(model, r.policy)
    if rec.patched_layers or fusion.fused_of(model) is not None:
        _state.patched[id(model)] = weakref.ref(model)
    return rec


def _fuse(model, doc: dict) -> dict:
    """Applies the policy's fusion (fusion.fuse: originals released, stock layout back on disable)
    and returns its report with linear calls per token before and after. Saving and mlx_lm's
    training entry points are guarded so no checkpoint is ever written in the fused layout."""
    stock_calls = sum(s["count"] for s in models.model_shapes(model))
    tic = time.perf_counter()
    fused = fusion.fuse(model, doc)
    report = fused.report()
    report["matmuls_per_token"] = [stock_calls, stock_calls - fused.calls_saved()]
    report["seconds"] = round(time.perf_counter() - tic, 4)
    if fused.instances:
        _guard_saving(model)
        _install_training_hooks()
    return report


def _patch_reachable_layers(model, doc: dict) -> int:
    """Patches only the layers whose shape some M routes to a non-native plan
    (`policy.may_leave_native`); the rest stay stock classes, so they pay nothing for the plugin's
    dispatch (about 1 µs of Python per call, which at 169 linears per token is several % of a fast
    GPU decode step). Returns how many."""
    return len(patch.apply(model, doc, reachable_only=True).layers)


def _from_daemon(want: dict, timeout: float, name: Optional[str] = None, weights: Optional[str] = None) -> _Resolved:
    key = (want["model"], want["mlx"], want["backend"])
    try:
        with DaemonClient(timeout=timeout) as client:
            client.hello()
            device = client.status().get("device_fingerprint")
            answer = client.policy_get(want["model"], want["mlx"], want["backend"], model_name=name, dtype=weights)
    except (DaemonUnavailable, DaemonError) as e:
        return _from_cache(key, why=str(e))
    if not isinstance(device, str) or not device:
        return _from_cache(key, why="the daemon's status has no device_fingerprint")
    _write_device_file(device)
    now = time.time()
    try:
        check_policy(answer["policy"], dict(want, device=device), answer.get("hash"))
    except Refused as e:
        _remove_cache(key)  # the cache mirrors the daemon's last answer, which was refused
        return _Resolved(None, "native", f"the daemon's policy was refused: {e}", device, warn=True)
    entry = _write_cache(key, device, answer, now)
    reason = str(answer.get("reason") or answer.get("source") or "served by the daemon")
    return _Resolved(answer["policy"], "daemon", reason, device, answer.get("evidence"), entry["fetched_at_iso"])


def _from_cache(key, why: str) -> _Resolved:
    entry, problem = _read_cache(key)
    if entry is None:
        return _Resolved(None, "native", f"{why}; {problem}; using native", warn=True)
    return _Resolved(
        entry["policy"],
        "cache",
        f"{why}; using the policy cached at {entry['fetched_at_iso']} "
        f"({entry['answer'].get('source', 'best')}: {entry['answer'].get('reason') or 'no reason given'})",
        entry["device_fingerprint"],
        entry["answer"].get("evidence"),
        entry["fetched_at_iso"],
        warn=True,
    )


def _from_file(path: Path, model, want: dict) -> _Resolved:
    if not path.is_file():
        return _Resolved(None, "native", f"policy source {path} is not a file; using native", warn=True)
    if path.suffix == ".py":
        try:
            doc = _tabulate_program(path, model, want)
        except Exception as e:
            return _Resolved(None, "native", f"tabulating {path} failed: {e}; using native", warn=True)
        try:
            check_policy(doc, dict(want, device="*"))
        except Refused as e:
            return _Resolved(None, "native", f"the policy tabulated from {path} was refused: {e}", warn=True)
        return _Resolved(doc, "file", f"tabulated choose_tile_size of {path} over the model's shapes")
    try:
        doc = policy.load(path)
    except (policy.PolicyError, OSError, UnicodeDecodeError) as e:
        return _Resolved(None, "native", f"policy file {path} refused: {e}", warn=True)
    device = _this_device(want)
    try:
        check_policy(doc, dict(want, device=device))
    except Refused as e:
        return _Resolved(None, "native", f"policy file {path} refused: {e}", device, warn=True)
    return _Resolved(doc, "file", f"policy file {path}", device)


def _tabulate_program(path: Path, model, want: dict) -> dict:
    """An OpenEvolve program's choose_tile_size, run by the evaluator's tabulate code (a separate
    `python -I` process with time and memory limits) over this model's shapes, as a policy for this
    model, MLX version and backend. Its device is "*": it was made here, now, for this process."""
    return tabulate.tabulate(
        path.read_text(encoding="utf-8"),
        models.model_shapes(model),
        device_info=tabulate.device_info(),
        target={"device": "*", "model": want["model"], "mlx": want["mlx"], "backend": want["backend"]},
        name=f"tabulated {path.name}"[:200],
    )


def _this_device(want: dict) -> Optional[str]:
    """This machine's device fingerprint: from the daemon if it answers, else the last one it gave."""
    try:
        with DaemonClient(timeout=_state.timeout) as client:
            client.hello()
            device = client.status().get("device_fingerprint")
        if isinstance(device, str) and device:
            _write_device_file(device)
            return device
    except (DaemonUnavailable, DaemonError):
        pass
    return _read_device_file()


# ---------------------------------------------------------------------------------------------
# The on-disk cache


@functools.lru_cache(maxsize=1)
def host_key() -> str:
    """A cheap identity of this machine (never leaves it): a cache written elsewhere is not used."""
    parts = [platform.node(), sys.platform, platform.machine(), str(os.cpu_count())]
    try:
        info = mx.device_info()
        parts += [str(info.get("device_name")), str(info.get("architecture")), str(info.get("memory_size"))]
    except Exception:
        pass
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:24]


def default_timeout_s() -> float:
    """``TILEWISE_PLUGIN_TIMEOUT_S`` (for slow or heavily loaded machines), else DEFAULT_TIMEOUT_S."""
    try:
        value = float(os.environ.get("TILEWISE_PLUGIN_TIMEOUT_S") or DEFAULT_TIMEOUT_S)
    except ValueError:
        return DEFAULT_TIMEOUT_S
    return value if value > 0 else DEFAULT_TIMEOUT_S


def cache_max_age_s() -> float:
    raw = os.environ.get("TILEWISE_POLICY_CACHE_MAX_AGE_S")
    try:
        return float(raw) if raw else DEFAULT_CACHE_MAX_AGE_S
    except ValueError:
        return DEFAULT_CACHE_MAX_AGE_S


def cache_path(key) -> Path:
    model, mlx, backend = key
    digest = hashlib.sha256(f"{model}\0{mlx}\0{backend}".encode()).hexdigest()[:32]
    return cache_dir() / "policies" / f"{digest}.json"


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def _atomic_write_json(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True), encoding="utf-8")
    os.replace(tmp, path)


#: An unchanged answer rewrites its cache entry only this often (the write is most of a fetch's cost).
CACHE_REFRESH_S = 3600


def _write_cache(key, device: str, answer: dict, now: float) -> dict:
    entry = {
        "format": CACHE_FORMAT,
        "key": {"model": key[0], "mlx": key[1], "backend": key[2]},
        "device_fingerprint": device,
        "host": host_key(),
        "fetched_at": now,
        "fetched_at_iso": _iso(now),
        "answer": {k: answer.get(k) for k in ("source", "reason", "evidence")},
        "hash": policy.content_hash(answer["policy"]),
        "policy": answer["policy"],
    }
    try:  # the same answer, recently written: keep the file (no validation needed to compare)
        old = json.loads(cache_path(key).read_text(encoding="utf-8"))
        fields = ("format", "key", "device_fingerprint", "host", "answer", "hash", "policy")
        same = all(old.get(f) == entry[f] for f in fields)
        if (
            same
            and 0 <= now - float(old["fetched_at"]) < CACHE_REFRESH_S
            and isinstance(old.get("fetched_at_iso"), str)
        ):
            return old
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        pass
    try:
        _atomic_write_json(cache_path(key), entry)
    except OSError as e:  # a read-only home must not cost the user their policy
        log.info("tilewise: cannot write the policy cache: %s", e)
    return entry


def _remove_cache(key) -> None:
    try:
        cache_path(key).unlink()
    except OSError:
        pass


def _read_cache(key):
    """(entry, None) when a valid cached policy exists, else (None, why not)."""
    path = cache_path(key)
    try:
        entry = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None, "no cached policy"
    except (OSError, ValueError) as e:
        return None, f"the cached policy {path} is unreadable ({e})"
    try:
        if not isinstance(entry, dict) or entry.get("format") != CACHE_FORMAT:
            raise Refused("unknown cache format")
        if entry.get("key") != {"model": key[0], "mlx": key[1], "backend": key[2]}:
            raise Refused("written for another model/MLX/backend")
        if entry.get("host") != host_key():
            raise Refused("written on another machine")
        age = time.time() - float(entry["fetched_at"])
        if age > cache_max_age_s() or age < -60:
            raise Refused(f"fetched {age / 3600:.1f} h ago, beyond the {cache_max_age_s() / 3600:.1f} h limit")
        want = {"device": entry["device_fingerprint"], "model": key[0], "mlx": key[1], "backend": key[2]}
        check_policy(entry["policy"], want, entry.get("hash"))
        if not isinstance(entry.get("answer"), dict) or not isinstance(entry.get("fetched_at_iso"), str):
            raise Refused("incomplete entry")
    except (Refused, KeyError, TypeError, ValueError) as e:
        return None, f"the cached policy {path} is not usable ({e})"
    return entry, None


def _device_file() -> Path:
    return cache_dir() / "device.json"


def _write_device_file(device: str) -> None:
    path = _device_file()
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
        if old.get("device_fingerprint") == device and old.get("host") == host_key():
            return
    except (OSError, ValueError, AttributeError):
        pass
    try:
        _atomic_write_json(
            path,
            {
                "format": DEVICE_FILE_FORMAT,
                "device_fingerprint": device,
                "host": host_key(),
                "seen_at": _iso(time.time()),
            },
        )
    except OSError as e:
        log.info("tilewise: cannot write %s: %s", path, e)


def _read_device_file() -> Optional[str]:
    try:
        d = json.loads(_device_file().read_text(encoding="utf-8"))
        if d.get("format") == DEVICE_FILE_FORMAT and d.get("host") == host_key():
            dev = d.get("device_fingerprint")
            return dev if isinstance(dev, str) and dev else None
    except (OSError, ValueError, AttributeError):
        pass
    return None


# ---------------------------------------------------------------------------------------------
# Warnings and the mlx_lm.load hook


def _warn(message: str) -> None:
    """One TilewiseWarning per process; everything after the first goes to the log (and status())."""
    if _state.warning is None:
        _state.warning = message
        warnings.warn(f"tilewise: {message}", TilewiseWarning, stacklevel=_user_stacklevel())
    else:
        log.info("tilewise: %s", message)


def _user_stacklevel() -> int:
    """The stacklevel that points the warning at the user's line (the first frame outside tilewise
    and mlx_lm), so the default warning filter shows where their load happened."""
    skip = (str(Path(__file__).resolve().parent), str(Path(mlx_lm.__file__).resolve().parent))
    frame, level = sys._getframe(1), 1
    while frame is not None and (
        frame.f_code.co_filename.startswith("<frozen") or str(Path(frame.f_code.co_filename).resolve()).startswith(skip)
    ):
        frame, level = frame.f_back, level + 1
    return level


def _unpatch(model) -> None:
    patch.remove(model)
    if fusion.unfuse(model):
        model.__dict__.pop("save_weights", None)
        model.__dict__.pop("load_weights", None)
    _state.patched.pop(id(model), None)
    _state.prefill.pop(id(model), None)
    _state.record_of.pop(id(model), None)


def _guard_saving(model) -> None:  # and loading
    """`model.save_weights(path)` of a fused model writes the stock layout (the fused arrays cut into
    their members' rows), so the file loads into stock mlx_lm; `model.load_weights` takes the stock
    layout. Instance attributes: only this model, gone with unfuse."""
    stock_save = type(model).save_weights

    def save_weights(file: str):
        fused = fusion.fused_of(model)
        if fused is None:
            return stock_save(model, file)
        weights = fused.to_stock(dict(tree_flatten(model.parameters())))
        if file.endswith(".npz"):
            mx.savez(file, **weights)
        elif file.endswith(".safetensors"):
            mx.save_safetensors(file, weights)
        else:
            raise ValueError("Unsupported file extension. Use '.npz' or '.safetensors'.")

    stock_load = type(model).load_weights

    def load_weights(file_or_weights, strict: bool = True):
        """Weights in the stock layout (any mlx_lm checkpoint) load into a fused model: it is
        unfused for the load and fused again after, from the new weights."""
        fused = fusion.fused_of(model)
        if fused is None:
            return stock_load(model, file_or_weights, strict=strict)
        fusion.unfuse(model)
        try:
            return stock_load(model, file_or_weights, strict=strict)
        finally:
            fusion.fuse(model, fused.doc())

    object.__setattr__(model, "save_weights", save_weights)
    object.__setattr__(model, "load_weights", load_weights)


def _unfuse_before(what: str):
    """A wrapper maker: the wrapped mlx_lm function gets the model in its stock layout (for good:
    what it makes — LoRA layers, checkpoints — must match stock mlx_lm)."""

    def make(original):
        def wrapper(model, *args, **kwargs):
            if fusion.fused_of(model) is not None:
                rec = _state.record_of.get(id(model))
                _unpatch(model)
                if rec is not None and rec.fusion is not None:
                    rec.fusion["unfused_for"] = what
                    rec.patched_layers = 0
                log.info("tilewise: model unfused for %s (stock layout)", what)
            return original(model, *args, **kwargs)

        return wrapper

    return make


def _save_stock(original):
    """`mlx_lm.utils.save_model(path, model, ...)` of a fused model saves the stock layout: the model
    is unfused for the save and fused again after (same policy)."""

    def save_model(save_path, model, *args, **kwargs):
        fused = fusion.fused_of(model)
        if fused is None:
            return original(save_path, model, *args, **kwargs)
        fusion.unfuse(model)
        try:
            return original(save_path, model, *args, **kwargs)
        finally:
            fusion.fuse(model, fused.doc())

    return save_model


def _install_training_hooks() -> None:
    """Wraps mlx_lm's LoRA conversion and trainer (they get the stock layout) and save_model."""
    # Imported here, not at the top: the tuner pulls in the optimizers and the trainer, which a
    # process that never fuses a model (or only generates) should not pay for.
    import mlx_lm.tuner.trainer as trainer
    import mlx_lm.tuner.utils as tuner_utils

    _wrap(tuner_utils, "linear_to_lora_layers", _unfuse_before("LoRA layers (mlx_lm.tuner)"))
    _wrap(trainer, "train", _unfuse_before("training with mlx_lm's trainer"))
    _wrap(mlx_lm_utils, "save_model", _save_stock)


def _mlx_lm_modules():
    return [
        m for name, m in list(sys.modules.items()) if m is not None and (name == "mlx_lm" or name.startswith("mlx_lm."))
    ]


def _wrap(module, name: str, make) -> None:
    """Replaces ``module.<name>`` by ``make(original)`` and rebinds every mlx_lm module that
    imported the original by name (``from .utils import load``); modules imported later pick the
    wrapper up from ``module``. Idempotent."""
    original = getattr(module, name)
    if getattr(original, "_tilewise_original", None) is not None:
        return
    wrapper = functools.wraps(original)(make(original))
    wrapper._tilewise_original = original
    for mod in _mlx_lm_modules():
        if getattr(mod, name, None) is original:
            setattr(mod, name, wrapper)
    setattr(module, name, wrapper)


def _unwrap(module_name: str, name: str) -> None:
    module = sys.modules.get(module_name)
    wrapper = getattr(module, name, None)
    original = getattr(wrapper, "_tilewise_original", None)
    if original is None:
        return
    for mod in _mlx_lm_modules():
        if getattr(mod, name, None) is wrapper:
            setattr(mod, name, original)


def _install_load_hook() -> None:
    """Wraps ``mlx_lm.utils.load`` (rebinding ``mlx_lm.load``, ``mlx_lm.generate.load``,
    ``mlx_lm.server.load``...) so that every model loaded gets its policy — after LoRA adapters are
    in place, which is why ``load`` and not ``load_model`` — and ``mlx_lm.generate.generate_step``
    so that a policy's ``generation.prefill_step_size`` is the default for its model."""
    # (not `import mlx_lm.generate`: the package's `generate` attribute is the function)
    mlx_lm_generate = importlib.import_module("mlx_lm.generate")

    def make_load(original):
        def load(*args, **kwargs):
            out = original(*args, **kwargs)
            if _state.enabled:
                name = args[0] if args else kwargs.get("path_or_hf_repo")
                apply_to(out[0], name=os.fspath(name) if isinstance(name, (str, os.PathLike)) else None)
            return out

        return load

    def make_generate_step(original):
        def generate_step(prompt, model, *args, **kwargs):
            if "prefill_step_size" not in kwargs:
                step = _prefill_step_for(model)
                if step is not None:
                    kwargs["prefill_step_size"] = step
            return original(prompt, model, *args, **kwargs)

        return generate_step

    _wrap(mlx_lm_utils, "load", make_load)
    _wrap(mlx_lm_generate, "generate_step", make_generate_step)


def _uninstall_load_hook() -> None:
    _unwrap("mlx_lm.utils", "load")
    _unwrap("mlx_lm.generate", "generate_step")
    _unwrap("mlx_lm.utils", "save_model")
    _unwrap("mlx_lm.tuner.utils", "linear_to_lora_layers")
    _unwrap("mlx_lm.tuner.trainer", "train")


def _prefill_step_for(model) -> Optional[int]:
    entry = _state.prefill.get(id(model))
    if entry is None or entry[0]() is not model:
        return None
    return entry[1]


def main(argv=None) -> int:
    """``python -m tilewise.plugin MODEL [--policy PATH]``: what the plugin would apply to MODEL
    (a path or Hugging Face id that mlx_lm.load finds locally), and why — without generating."""
    ap = argparse.ArgumentParser(prog="python -m tilewise.plugin", description=main.__doc__.split(":", 1)[1].strip())
    ap.add_argument("model", help="model path or repo id (as for mlx_lm.load)")
    ap.add_argument("--policy", default=None, help="a policy JSON or OpenEvolve best_program.py instead of the daemon")
    ap.add_argument("--timeout", type=float, default=None, help="seconds for the daemon to answer")
    ap.add_argument("--json", action="store_true", help="print status() as JSON")
    args = ap.parse_args(argv)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TilewiseWarning)  # the same text is in the status below
        enable_optimizations(args.policy, timeout=args.timeout)
        mlx_lm.load(args.model)
    st = status()
    print(json.dumps(st.as_dict(), indent=1) if args.json else st)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
