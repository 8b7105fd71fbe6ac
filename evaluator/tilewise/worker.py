"""`python -m tilewise.worker`: the long-lived measuring process the daemon drives.

The contract is docs/worker-protocol.md (JSON lines on stdin/stdout); this module is its Python side.
Structure: a reader thread parses stdin, answers `cancel` at once (so it is seen while a measurement
runs) and queues every other request; the main thread executes queued requests one at a time with
the model kept loaded between them. Every reply is one JSON line written under a lock. Anything a
request does wrong becomes an `error` reply; nothing a client sends ends the process except
`shutdown` (or closing stdin).

stdout belongs to the protocol: at start the real stdout is kept for replies and file descriptor 1
is pointed at stderr, so stray prints (from libraries too) cannot corrupt the stream. That is why MLX
and the measuring modules are imported inside the functions here, after `main` has moved fd 1: a
library that prints while it is imported must not write into the protocol.
"""

import json
import os
import queue
import signal
import sys
import threading
import time
import traceback

PROTOCOL = 1
MAX_LINE_BYTES = 1 << 20
FAULT_KINDS = ("hang", "crash", "garbage", "oom")
OOM_HEADROOM_BYTES = 512 << 20
OOM_HARD_CAP_BYTES = 4 << 30


class RequestError(Exception):
    """An error reply: `code` from docs/worker-protocol.md and a message."""

    def __init__(self, code, message):
        super().__init__(message)
        self.code = code
        self.message = message


def _bad(message):
    return RequestError("bad_request", message)


def _int_field(req, name, default, lo, hi):
    v = req.get(name, default)
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise _bad(f"{name}: an integer in {lo}..{hi}")
    return v


def _sizes(req, name, fields):
    """`inference`/`training` request field: absent = backend default ({}), null = skip (None)."""
    if name not in req:
        return {}
    v = req[name]
    if v is None:
        return None
    if not isinstance(v, dict):
        raise _bad(f"{name}: an object with {', '.join(fields)}, or null to skip it")
    for f in v:
        if f not in fields:
            raise _bad(f"{name}.{f}: unknown field (expected {', '.join(fields)})")
        if not isinstance(v[f], int) or isinstance(v[f], bool) or not 1 <= v[f] <= 1 << 20:
            raise _bad(f"{name}.{f}: a positive integer")
    return dict(v)


class Output:
    """Protocol writer: one JSON object per line, lines capped at MAX_LINE_BYTES, under a lock."""

    def __init__(self, stream):
        self.stream = stream
        self.lock = threading.Lock()

    def send(self, obj):
        line = json.dumps(obj, separators=(",", ":"), allow_nan=False, default=str)
        if len(line.encode("utf-8")) >= MAX_LINE_BYTES and obj.get("type") == "result":
            line = json.dumps(
                {
                    "id": obj.get("id"),
                    "type": "error",
                    "error": {"code": "internal", "message": f"result exceeds {MAX_LINE_BYTES} bytes"},
                }
            )
        self.raw(line)

    def raw(self, line):
        with self.lock:
            self.stream.write(line + "\n")
            self.stream.flush()

    def error(self, rid, code, message):
        self.send({"id": rid, "type": "error", "error": {"code": code, "message": message}})


class Worker:
    def __init__(self, out, env_fault=None):
        self.out = out
        self.env_fault = env_fault  # (op, kind) from TILEWISE_WORKER_FAULT
        self.queue = queue.Queue()
        self.model = None
        self.tokenizer = None
        self.info = None
        self.traced = None  # the loaded model's sibling trace (fusion.trace), taken at load
        self.current = None  # id of the request being executed
        self.cancelled = set()
        self.lock = threading.Lock()

    # -- stdin thread ------------------------------------------------------------------------

    def read_stdin(self, stream):
        for raw in iter(stream.readline, b""):
            self.on_line(raw)
        self.queue.put(None)  # EOF: the daemon went away; finish and exit

    def on_line(self, raw):
        if len(raw) > MAX_LINE_BYTES:
            return self.out.error(None, "bad_request", f"request line exceeds {MAX_LINE_BYTES} bytes")
        if not raw.strip():
            return None
        try:
            req = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            return self.out.error(None, "bad_request", f"not JSON: {e}")
        if not isinstance(req, dict):
            return self.out.error(None, "bad_request", "a request is a JSON object")
        rid = req.get("id")
        if not isinstance(rid, int) or isinstance(rid, bool):
            return self.out.error(
                rid if isinstance(rid, (str, int)) else None, "bad_request", "id: an integer is required"
            )
        if req.get("op") == "cancel":
            return self.cancel(req)
        self.queue.put(req)
        return None

    def cancel(self, req):
        target = req.get("target")
        if not isinstance(target, int) or isinstance(target, bool):
            return self.out.error(req["id"], "bad_request", "target: the id of a request")
        with self.lock:
            state = "running" if target == self.current else "queued-or-unknown"
            self.cancelled.add(target)
        self.out.send({"id": req["id"], "type": "result", "result": {"target": target, "state": state}})
        return None

    # -- main thread -------------------------------------------------------------------------

    def should_stop(self):
        return self.current in self.cancelled

    def serve(self):
        while True:
            req = self.queue.get()
            if req is None:
                return 0
            rid = req["id"]
            with self.lock:
                self.current = rid
            try:
                if rid in self.cancelled:
                    raise RequestError("cancelled", "cancelled before it started")
                result = self.handle(req)
                self.out.send({"id": rid, "type": "result", "result": result})
                if req.get("op") == "shutdown":
                    return 0
            except RequestError as e:
                self.out.error(rid, e.code, e.message)
            except Exception as e:
                from .measure import Cancelled

                if isinstance(e, Cancelled):
                    self.out.error(rid, "cancelled", "cancelled by request")
                else:
                    traceback.print_exc(file=sys.stderr)
                    self.out.error(rid, "internal", f"{type(e).__name__}: {e}")
            finally:
                with self.lock:
                    self.current = None
                    self.cancelled.discard(rid)

    def handle(self, req):
        op = req.get("op")
        handler = OPS.get(op) if isinstance(op, str) else None
        if handler is None:
            raise _bad(f"unknown op {op!r} (known: {', '.join(sorted(OPS))}, cancel)")
        kind = req.get("inject_fault")
        if kind is None and self.env_fault and self.env_fault[0] == op:
            kind = self.env_fault[1]
        if kind is not None:
            self.inject(kind)
        return handler(self, req)

    def progress(self, rid, stage, done, total):
        self.out.send({"id": rid, "type": "progress", "stage": stage, "done": done, "total": total})

    def need_model(self):
        if self.model is None:
            raise RequestError("no_model", "no model loaded: send a load request first")

    def inject(self, kind):
        """Test-only faults, so the daemon's handling of each can be exercised for real."""
        if kind not in FAULT_KINDS:
            raise _bad(f"inject_fault: one of {', '.join(FAULT_KINDS)}")
        print(f"tilewise worker: injecting fault {kind}", file=sys.stderr, flush=True)
        if kind == "hang":
            while True:
                time.sleep(3600)
        if kind == "crash":
            os._exit(3)
        if kind == "garbage":
            self.out.raw("this line is not JSON {{{")  # then the request is answered normally
            return
        if kind == "oom":
            _allocate_until_killed()


def _allocate_until_killed():
    """Allocates until the address-space limit is hit, then dies by SIGKILL as the kernel's OOM
    killer would kill it. RLIMIT_AS is set just above current use first, and there is a hard cap,
    so the machine itself never runs short."""
    try:
        import resource

        with open("/proc/self/statm") as f:
            current = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
        limit = current + OOM_HEADROOM_BYTES
        resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))
    except (OSError, ValueError, ImportError):
        pass  # no /proc (macOS): the hard cap below still bounds the allocation
    hoard, total = [], 0
    try:
        while total < OOM_HARD_CAP_BYTES:
            block = bytearray(64 << 20)
            block[::4096] = b"\x01" * len(block[::4096])  # touch every page
            hoard.append(block)
            total += len(block)
    except MemoryError:
        pass
    print(f"tilewise worker: out of memory after {total >> 20} MiB", file=sys.stderr, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)


# -- ops -----------------------------------------------------------------------------------------


def op_ping(w, req):
    return {"pong": True}


def op_shutdown(w, req):
    return {"bye": True}


def op_load(w, req):
    import mlx.core as mx

    from . import fusion, models, workloads

    spec = req.get("model")
    if not isinstance(spec, str) or not spec:
        raise _bad(
            "model: a path, a Hugging Face repo id, or synthetic:tiny | synthetic:qwen2.5-0.5b | synthetic:llama-3.2-1b"
        )
    dtype = req.get("dtype")
    if dtype is not None and dtype not in models.DTYPES:
        raise _bad(f"dtype: one of {', '.join(models.DTYPES)}")
    try:
        model, tokenizer, info = models.load_model(spec, dtype=dtype)
    except models.ModelNotFound as e:
        raise RequestError("model_not_found", str(e)) from None
    w.model, w.tokenizer, w.info = model, tokenizer, info
    try:
        w.traced = fusion.trace(model)
        groups, trace_error = fusion.groups_of(model, w.traced), None
    except Exception as e:  # a model the trace cannot run leaves fusion out of the search
        w.traced, groups, trace_error = {}, [], f"{type(e).__name__}: {e}"
    return {
        "model_fingerprint": info["model_fingerprint"],
        "model_path": info["model_path"],
        "config": info["config"],
        "dtype": info["dtype"],
        "weights": info["weights"],
        "backend": workloads.backend(),
        "mlx": mx.__version__,
        "device_name": workloads.device_name(),
        "shapes": models.model_shapes(model),
        "fusion_groups": groups,
        "fusion_trace_error": trace_error,
    }


def _policy_field(doc, backend):
    from . import policy

    if not isinstance(doc, dict):
        raise _bad("policy: a policy object")
    try:
        policy.validate_for_backend(doc, backend)
    except policy.PolicyError as e:
        raise RequestError("invalid_policy", str(e)) from None
    return doc


def _race_field(req, workloads):
    """`race: {bar?, min_pairs?, assume_hi?, max_pairs?, halfwidth?}` (absent or null: every pair is run)."""
    from . import measure

    v = req.get("race")
    if v is None:
        return None
    if not isinstance(v, dict):
        raise _bad("race: an object {bar, min_pairs, assume_hi, max_pairs, halfwidth} or null")
    for f in v:
        if f not in ("bar", "min_pairs", "assume_hi", "max_pairs", "halfwidth"):
            raise _bad(f"race.{f}: unknown field (expected bar, min_pairs, assume_hi, max_pairs, halfwidth)")
    try:
        return measure.Race(workloads, **v)
    except ValueError as e:
        raise _bad(str(e)) from None


def op_evaluate(w, req):
    from . import evaluate, measure, workloads

    w.need_model()
    doc = _policy_field(req.get("policy"), workloads.backend())
    inference = _sizes(req, "inference", ("prompt_tokens", "gen_tokens", "batch"))
    training = _sizes(req, "training", ("batch", "seq"))
    if inference is None and training is None:
        raise _bad("inference and training are both null: nothing to measure")
    pairs = _int_field(req, "pairs", 10, 1, 10000)
    warmup = _int_field(req, "warmup", 2, 0, 1000)
    seed = _int_field(req, "seed", 0, 0, 2**31 - 1)
    # evaluate.py measures inference, then training; the race takes them in that order.
    race = _race_field(req, [n for n, v in (("inference", inference), ("training", training)) if v is not None])
    rid = req["id"]
    with measure.racing(race):
        result = evaluate.evaluate(
            w.model,
            doc,
            dtype=w.info["dtype"],
            inference=inference,
            training=training,
            pairs=pairs,
            warmup=warmup,
            seed=seed,
            skip_inference=inference is None,
            skip_training=training is None,
            traced=w.traced,
            progress=lambda stage, done, total: w.progress(rid, stage, done, total),
            should_stop=w.should_stop,
        )
    if race is not None:
        result["race"] = race.state() if result["correct"] else None
    for part in ("inference", "training"):
        if result[part] is not None:
            result[part].pop("ratios", None)  # the samples carry them
    return result


def op_shapes(w, req):
    from . import policy, shapes

    items = req.get("items")
    if not isinstance(items, list) or not items:
        raise _bad("items: a non-empty list of {m, n, k, dtype, plan}")
    for i, item in enumerate(items):
        problem = shapes.check_item(item, i)
        if problem:
            raise _bad(problem)
        try:
            shapes.item_policy(item)
        except policy.PolicyError as e:
            raise RequestError("invalid_policy", f"items[{i}]: {e}") from None
    pairs = _int_field(req, "pairs", 10, 1, 10000)
    warmup = _int_field(req, "warmup", 2, 0, 1000)
    out = []
    for i, item in enumerate(items):
        out.append(shapes.bench_item(item, pairs=pairs, warmup=warmup, should_stop=w.should_stop))
        w.progress(req["id"], "shapes", i + 1, len(items))
    return {"items": out}


# No op runs code a client sends: the daemon never asks for it (an LLM's reply is data only, and a
# user's own OpenEvolve program is tabulated by the plugin in their own process).
OPS = {"ping": op_ping, "load": op_load, "evaluate": op_evaluate, "shapes": op_shapes, "shutdown": op_shutdown}


def _env_fault():
    v = os.environ.get("TILEWISE_WORKER_FAULT")
    if not v:
        return None
    op, _, kind = v.partition(":")
    if kind not in FAULT_KINDS:
        print(
            f"tilewise worker: ignoring TILEWISE_WORKER_FAULT={v!r} (want <op>:<{'|'.join(FAULT_KINDS)}>)",
            file=sys.stderr,
            flush=True,
        )
        return None
    return op, kind


def main():
    # Keep the real stdout for the protocol; everything else that writes to fd 1 goes to stderr.
    proto = os.fdopen(os.dup(1), "w", encoding="utf-8", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    out = Output(proto)

    import mlx.core as mx

    from . import fusion, patch, workloads

    planted = os.environ.get("TILEWISE_PLANT_BUG")  # tests only: see patch/fusion.plant_bug
    if planted in fusion.PLANTED_BUGS:
        fusion.plant_bug(planted)
    elif planted:
        patch.plant_bug(planted)
    worker = Worker(out, env_fault=_env_fault())
    out.send(
        {
            "id": 0,
            "type": "ready",
            "protocol": PROTOCOL,
            "mlx": mx.__version__,
            "backend": workloads.backend(),
            "pid": os.getpid(),
        }
    )
    reader = threading.Thread(target=worker.read_stdin, args=(sys.stdin.buffer,), daemon=True)
    reader.start()
    code = worker.serve()
    proto.flush()
    os._exit(code)  # do not wait for the reader thread blocked on stdin


if __name__ == "__main__":
    main()
