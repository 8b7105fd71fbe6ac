"""What this process runs with each model, reported to the daemon so it tunes what is actually run.

The plugin puts a thin recorder in front of each model it applies a policy to (:func:`watch`): every
forward call notes its input's (batch, length) — nothing else of the input — and from those the
recorder keeps, per model:

- generation kinds: (batch, prompt tokens, generated tokens, prefill step) → how many. A generation
  is a run of prefill forwards (length > 1) followed by decode forwards (length 1); sizes are
  rounded down to powers of two, so the record holds no exact lengths either;
- matmul shapes: (M bucket, N, K) → calls, M = batch × length, over the model's stock linear shapes.

Never any prompt text, token ids or outputs: the recorder never reads an array's values
(tests/test_usage.py checks the reports). A background thread sends the record (``usage.report``,
docs/protocol.md) at most once per :data:`REPORT_EVERY_S` and once at exit, each with a short
timeout; when the daemon is absent the record is dropped silently. ``TILEWISE_USAGE=0`` turns the
recorder off.
"""

from __future__ import annotations

import atexit
import collections
import logging
import os
import threading
import time
import weakref
from typing import Optional

from .daemon_client import DaemonClient, DaemonError, DaemonUnavailable

log = logging.getLogger("tilewise.usage")

#: Seconds between reports (env ``TILEWISE_USAGE_INTERVAL_S`` overrides, for tests).
REPORT_EVERY_S = 60.0
#: Timeout of one report: it runs in a background thread, and at exit it bounds the delay.
REPORT_TIMEOUT_S = 0.5
#: Distinct kinds kept per model between reports (the daemon refuses more; the rarest go first).
MAX_GENERATIONS = 64
MAX_SHAPES = 512


def enabled() -> bool:
    return os.environ.get("TILEWISE_USAGE", "1").strip().lower() not in ("0", "false", "no", "off")


def interval_s() -> float:
    try:
        return max(0.05, float(os.environ.get("TILEWISE_USAGE_INTERVAL_S", REPORT_EVERY_S)))
    except ValueError:
        return REPORT_EVERY_S


def bucket(n: int) -> int:
    """The largest power of two ≤ n (n ≥ 1)."""
    return 1 << (max(1, int(n)).bit_length() - 1)


class ModelUsage:
    """The record of one model: generation kinds and forward (batch, length) counts."""

    def __init__(self, fingerprint: str, name: Optional[str], linear_shapes):
        self.fingerprint = fingerprint
        self.name = name
        # [(N, K, count per token)] of the stock model
        self.linear_shapes = [(int(s["n"]), int(s["k"]), int(s["count"])) for s in linear_shapes]
        self.generations: collections.Counter = collections.Counter()
        self.forwards: collections.Counter = collections.Counter()  # (M bucket) -> forward calls
        self.since = time.time()
        # the generation in progress: [batch, prompt tokens, generated tokens, prefill chunks, largest chunk]
        self.current: Optional[list] = None

    def forward(self, batch: int, length: int, training: bool) -> None:
        self.forwards[bucket(batch * length)] += 1
        if training:
            return
        cur = self.current
        if length > 1:
            if cur is not None and cur[2] > 0:  # decode had started: this is a new generation
                self._close()
                cur = None
            if cur is None:
                cur = self.current = [batch, 0, 0, 0, 0]
            cur[1] += length
            cur[3] += 1
            cur[4] = max(cur[4], length)
        else:
            if cur is None:
                cur = self.current = [batch, 1, 0, 0, 0]
            cur[2] += 1

    def _close(self) -> None:
        cur, self.current = self.current, None
        if cur is None or cur[2] == 0:
            return
        batch, prompt, generated, chunks, largest = cur
        step = bucket(largest) if chunks > 1 else None
        self.generations[(bucket(batch), bucket(prompt), bucket(generated), step)] += 1

    def take(self) -> Optional[dict]:
        """The report since the last one (and starts a new record), or None if nothing ran."""
        self._close()
        if not self.generations and not self.forwards:
            return None
        now = time.time()
        gens = [
            {"batch": b, "prompt_tokens": p, "generated_tokens": g, "count": c, **({"prefill_step": s} if s else {})}
            for (b, p, g, s), c in self.generations.most_common(MAX_GENERATIONS)
        ]
        shapes = collections.Counter()
        for m, calls in self.forwards.items():
            for n, k, per_token in self.linear_shapes:
                shapes[(m, n, k)] += calls * per_token
        report = {
            "model": self.fingerprint,
            "period_s": round(min(now - self.since, 7 * 24 * 3600.0), 3),
            "generations": gens,
            "shapes": [{"m": m, "n": n, "k": k, "calls": c} for (m, n, k), c in shapes.most_common(MAX_SHAPES)],
        }
        if self.name:
            report["model_name"] = self.name
        self.generations.clear()
        self.forwards.clear()
        self.since = now
        return report


class Recorder:
    """Every watched model's usage, and the thread that reports it."""

    def __init__(self):
        self.lock = threading.Lock()
        self.models: dict = {}  # fingerprint -> ModelUsage
        self.thread: Optional[threading.Thread] = None
        self.wake = threading.Event()
        self.stopped = False
        self.sent = 0

    def record(self, fingerprint: str, batch: int, length: int, training: bool) -> None:
        with self.lock:
            u = self.models.get(fingerprint)
            if u is not None:
                u.forward(batch, length, training)

    def add(self, fingerprint: str, name: Optional[str], linear_shapes) -> None:
        with self.lock:
            if fingerprint not in self.models:
                self.models[fingerprint] = ModelUsage(fingerprint, name, linear_shapes)
            elif name and not self.models[fingerprint].name:
                self.models[fingerprint].name = name
        self._start()

    def take_reports(self) -> list:
        with self.lock:
            return [r for r in (u.take() for u in self.models.values()) if r is not None]

    def send(self, timeout: float = REPORT_TIMEOUT_S) -> int:
        """Sends what was recorded; returns how many reports the daemon took. Never raises."""
        reports = self.take_reports()
        if not reports:
            return 0
        sent = 0
        try:
            with DaemonClient(timeout=timeout) as client:
                client.hello()
                for r in reports:
                    client.call("usage.report", r)
                    sent += 1
        except (DaemonUnavailable, DaemonError, OSError) as e:
            log.debug("usage not reported: %s", e)
        self.sent += sent
        return sent

    def _start(self) -> None:
        if self.thread is not None:
            return
        self.thread = threading.Thread(target=self._run, name="tilewise-usage", daemon=True)
        self.thread.start()
        atexit.register(self._at_exit)

    def _run(self) -> None:
        while not self.stopped:
            self.wake.wait(interval_s())
            self.wake.clear()
            if self.stopped:
                return
            self.send()

    def _at_exit(self) -> None:
        self.stopped = True
        self.wake.set()
        self.send()


_recorder = Recorder()


def recorder() -> Recorder:
    return _recorder


# ---------------------------------------------------------------------------------------------
# The forward hook: a subclass of the model's class whose __call__ notes (batch, length) first


_watched_classes: dict = {}  # original class -> recording subclass


def _recording_class(cls):
    sub = _watched_classes.get(cls)
    if sub is None:

        def __call__(self, *args, **kwargs):
            fp = self.__dict__.get("_tilewise_usage_fp")
            inputs = args[0] if args else kwargs.get("inputs")
            shape = getattr(inputs, "shape", None)
            if fp is not None and shape is not None and len(shape) in (1, 2):
                batch, length = (1, shape[0]) if len(shape) == 1 else (shape[0], shape[1])
                _recorder.record(fp, int(batch), int(length), bool(getattr(self, "training", False)))
            return cls.__call__(self, *args, **kwargs)

        sub = type(
            cls.__name__, (cls,), {"__call__": __call__, "_tilewise_usage_original": cls, "__module__": cls.__module__}
        )
        _watched_classes[cls] = sub
    return sub


def watch(model, fingerprint: str, name: Optional[str], linear_shapes) -> bool:
    """Starts recording `model`'s forwards (returns False when usage reporting is off)."""
    if not enabled():
        return False
    cls = type(model)
    if getattr(cls, "_tilewise_usage_original", None) is None:
        model.__class__ = _recording_class(cls)
    # nn.Module is a dict: plain attributes live in __dict__, not among the parameters
    object.__setattr__(model, "_tilewise_usage_fp", fingerprint)
    _recorder.add(fingerprint, name, linear_shapes)
    _watched[id(model)] = weakref.ref(model)
    return True


_watched: dict = {}


def unwatch(model) -> None:
    original = getattr(type(model), "_tilewise_usage_original", None)
    if original is not None:
        model.__class__ = original
    model.__dict__.pop("_tilewise_usage_fp", None)
    _watched.pop(id(model), None)


def unwatch_all() -> None:
    for ref in list(_watched.values()):
        m = ref()
        if m is not None:
            unwatch(m)
    _watched.clear()
