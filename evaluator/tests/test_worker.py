"""The worker protocol (docs/worker-protocol.md), driven like the daemon drives it: a real
`python -m tilewise.worker` child, JSON lines over pipes."""

import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

from tilewise import models, tabulate
from tilewise import policy as P

SMALL = {"inference": {"prompt_tokens": 16, "gen_tokens": 16}, "training": {"batch": 2, "seq": 16}}
SOURCE = """
def choose_tile_size(M, N, K, device_info):
    assert device_info["backend"] == "cpu"
    if M == 1:
        return None                      # native for decode
    return (None, 64 if N > 100 else None, 32)
"""


class Worker:
    def __init__(self, env=None):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tilewise.worker"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env={**os.environ, **(env or {})},
        )
        self.lines = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()
        self.ready = self.next_json(timeout=60)

    def _pump(self):
        for raw in self.proc.stdout:
            self.lines.put(raw.decode())
        self.lines.put(None)

    def send(self, obj):
        data = obj if isinstance(obj, (bytes, str)) else json.dumps(obj)
        data = data.encode() if isinstance(data, str) else data
        self.proc.stdin.write(data + b"\n")
        self.proc.stdin.flush()

    def next_line(self, timeout=120):
        line = self.lines.get(timeout=timeout)
        assert line is not None, f"worker exited: {self.proc.wait()} {self.proc.stderr.read().decode()[-2000:]}"
        return line

    def next_json(self, timeout=120):
        return json.loads(self.next_line(timeout))

    def final(self, rid, timeout=300, progress=None):
        """Reads until the final reply of `rid`; progress lines go to `progress`."""
        while True:
            msg = self.next_json(timeout)
            assert msg["id"] in (rid, None) or msg["type"] == "result", msg
            if msg["id"] == rid and msg["type"] == "progress":
                if progress is not None:
                    progress.append(msg)
                continue
            if msg["id"] == rid:
                return msg

    def call(self, rid, op, **fields):
        self.send({"id": rid, "op": op, **fields})
        return self.final(rid)

    def close(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


@pytest.fixture
def worker(tiny):  # `tiny` synthesizes the model once, so workers only load it
    w = Worker()
    yield w
    w.close()


@pytest.fixture
def loaded(worker):
    r = worker.call(1, "load", model="synthetic:tiny")
    assert r["type"] == "result", r
    return worker


def error_code(msg):
    assert msg["type"] == "error", msg
    return msg["error"]["code"]


def test_ready_ping_shutdown(worker):
    assert worker.ready == {
        "id": 0,
        "type": "ready",
        "protocol": 1,
        "mlx": "0.32.4",
        "backend": "cpu",
        "pid": worker.proc.pid,
    }
    assert worker.call(5, "ping") == {"id": 5, "type": "result", "result": {"pong": True}}
    assert worker.call(6, "shutdown")["result"] == {"bye": True}
    assert worker.proc.wait(timeout=30) == 0


def test_load_reports_model_and_shapes(worker, tiny):
    r = worker.call(2, "load", model="synthetic:tiny")["result"]
    assert r["model_fingerprint"] == tiny[2]["model_fingerprint"]
    assert r["model_path"] == tiny[2]["model_path"]
    assert r["dtype"] == "float32" and r["backend"] == "cpu" and r["mlx"] == "0.32.4"
    assert r["config"]["hidden_size"] == 64 and r["device_name"]
    assert {(s["n"], s["k"]): s["count"] for s in r["shapes"]} == {
        (64, 64): 4,
        (32, 64): 4,
        (128, 64): 4,
        (64, 128): 2,
        (1024, 64): 1,
    }
    bf16 = worker.call(3, "load", model=r["model_path"], dtype="bfloat16")["result"]
    assert bf16["dtype"] == "bfloat16" and bf16["model_fingerprint"] != r["model_fingerprint"]


def test_bad_requests_get_error_lines_and_the_worker_lives_on(worker):
    worker.send("this is not json")
    assert error_code(worker.next_json()) == "bad_request"
    worker.send("[1, 2]")
    assert error_code(worker.next_json()) == "bad_request"
    worker.send({"op": "ping"})  # no id
    assert error_code(worker.next_json()) == "bad_request"
    worker.send(b"\xff\xfe")
    assert error_code(worker.next_json()) == "bad_request"
    worker.send(b"{" + b" " * (1 << 20) + b"}")
    msg = worker.next_json()
    assert error_code(msg) == "bad_request" and "1048576" in msg["error"]["message"]
    assert error_code(worker.call(10, "warp")) == "bad_request"
    assert error_code(worker.call(11, 7)) == "bad_request"
    assert error_code(worker.call(12, "evaluate", policy=P.native())) == "no_model"
    assert error_code(worker.call(13, "tabulate", source=SOURCE)) == "bad_request", "no op runs a client's code"
    assert error_code(worker.call(14, "load")) == "bad_request"
    assert error_code(worker.call(15, "load", model="/nonexistent/model")) == "model_not_found"
    assert error_code(worker.call(16, "load", model="synthetic:nope")) == "model_not_found"
    assert error_code(worker.call(17, "load", model="synthetic:tiny", dtype="int3")) == "bad_request"
    assert error_code(worker.call(18, "shapes", items=[])) == "bad_request"
    assert (
        error_code(
            worker.call(19, "shapes", items=[{"m": 0, "n": 1, "k": 1, "dtype": "float32", "plan": {"kind": "native"}}])
        )
        == "bad_request"
    )
    bad_plan = worker.call(20, "shapes", items=[{"m": 1, "n": 8, "k": 8, "dtype": "float32", "plan": P.split_plan(0)}])
    assert error_code(bad_plan) == "invalid_policy"
    assert "items[0]: invalid policy: matmul.rules[0].plan.tile_m" in bad_plan["error"]["message"]
    assert error_code(worker.call(21, "cancel")) == "bad_request"
    assert worker.call(22, "ping")["result"] == {"pong": True}
    assert worker.proc.poll() is None


def test_bad_evaluate_requests(loaded):
    w = loaded
    msg = w.call(30, "evaluate", policy={"schema": "tilewise.policy/1"})
    assert error_code(msg) == "invalid_policy" and "target" in msg["error"]["message"]
    doc = P.make_policy(default=P.split_plan(None, None, 0 + 1))
    doc["matmul"]["rules"] = [{"m": [9, 4], "plan": {"kind": "native"}}]
    msg = w.call(31, "evaluate", policy=doc)
    assert error_code(msg) == "invalid_policy" and "matmul.rules[0].m: lo > hi" in msg["error"]["message"]
    cuda_only = P.native()
    cuda_only["target"]["backend"] = "cuda"
    msg = w.call(32, "evaluate", policy=cuda_only)
    assert error_code(msg) == "invalid_policy" and "this machine runs cpu" in msg["error"]["message"]
    assert error_code(w.call(33, "evaluate", policy="native")) == "bad_request"
    assert error_code(w.call(34, "evaluate", policy=P.native(), pairs=0)) == "bad_request"
    assert error_code(w.call(35, "evaluate", policy=P.native(), inference={"prompt_tokens": -1})) == "bad_request"
    assert error_code(w.call(36, "evaluate", policy=P.native(), inference={"tokens": 5})) == "bad_request"
    assert error_code(w.call(37, "evaluate", policy=P.native(), inference=None, training=None)) == "bad_request"
    assert w.call(38, "ping")["result"] == {"pong": True}


def test_evaluate_reports_gate_timing_and_calls(loaded):
    progress = []
    doc = P.make_policy(default=P.split_plan(None, 64, 32))
    loaded.send({"id": 40, "op": "evaluate", "policy": doc, "pairs": 3, "warmup": 1, **SMALL})
    r = loaded.final(40, progress=progress)["result"]
    assert r["policy_hash"] == P.content_hash(doc)
    assert r["correct"] is True and r["gate"]["reason"] is None
    assert 0 < r["gate"]["logits_rel_err"] <= r["gate"]["tolerance"] == 1e-4
    assert r["calls"]["split"] > 0 and r["calls"]["native"] == 0
    for part in ("inference", "training"):
        assert r[part]["n_pairs"] == 3 and len(r[part]["samples"]) == 6
        assert r[part]["lo"] <= r[part]["ratio"] <= r[part]["hi"]
        assert set(r[part]["peak_memory"]) == {"stock", "candidate"}
        cpu = r[part]["cpu_time"]
        assert cpu["lo"] <= cpu["ratio"] <= cpu["hi"] and all(s["cpu_s"] > 0 for s in r[part]["samples"])
    s = r["inference"]["samples"][0]
    assert set(s) >= {"pair", "arm", "seconds", "prefill_s", "decode_s", "peak_memory"}
    assert r["inference"]["decode_tok_s"]["stock"] > 0
    assert r["combined"]["ratio"] == pytest.approx(0.7 * r["inference"]["ratio"] + 0.3 * r["training"]["ratio"])
    stages = [(p["stage"], p["done"]) for p in progress]
    assert stages[:2] == [("gate", 0), ("gate", 1)] and ("inference", 3) in stages and stages[-1] == ("training", 3)

    only_inf = loaded.call(
        41, "evaluate", policy=P.native(), pairs=2, warmup=0, training=None, inference=SMALL["inference"]
    )["result"]
    assert only_inf["training"] is None and only_inf["combined"]["ratio"] == only_inf["inference"]["ratio"]

    batched = loaded.call(
        42,
        "evaluate",
        policy=P.native(),
        pairs=2,
        warmup=0,
        training=None,
        inference={**SMALL["inference"], "batch": 4},
    )["result"]
    assert batched["inference"]["sizes"]["batch"] == 4
    # tokens per second count every sequence of the batch
    assert batched["inference"]["decode_tok_s"]["stock"] > 0


def test_planted_wrong_plan_is_reported_incorrect(tiny):
    w = Worker(env={"TILEWISE_PLANT_BUG": "drop_last_k_tile"})
    try:
        assert w.call(1, "load", model="synthetic:tiny")["type"] == "result"
        r = w.call(2, "evaluate", policy=P.make_policy(default=P.split_plan(None, None, 32)), pairs=2, **SMALL)[
            "result"
        ]
        assert r["correct"] is False and "logits relative error" in r["gate"]["reason"]
        assert r["inference"] is None and r["training"] is None and r["combined"] is None
    finally:
        w.close()


def test_cancel_stops_a_running_evaluation(loaded):
    loaded.send(
        {
            "id": 50,
            "op": "evaluate",
            "policy": P.native(),
            "pairs": 10000,
            "warmup": 0,
            "training": None,
            "inference": SMALL["inference"],
        }
    )
    while True:  # wait until timing is under way
        msg = loaded.next_json()
        if msg.get("stage") == "inference":
            break
    loaded.send({"id": 51, "op": "cancel", "target": 50})
    replies = {}
    while 50 not in replies or 51 not in replies:
        msg = loaded.next_json(timeout=60)
        if msg["type"] != "progress":
            replies[msg["id"]] = msg
    assert replies[51]["result"] == {"target": 50, "state": "running"}
    assert error_code(replies[50]) == "cancelled"
    assert loaded.call(52, "ping")["result"] == {"pong": True}


def test_shapes_microbenchmark(loaded):
    kernel = {
        "kind": "kernel",
        "backend": "cuda",
        "family": "gemv",
        "rows_per_block": 4,
        "vector_width": 4,
        "split_k": 1,
    }
    items = [
        {"m": 1, "n": 256, "k": 128, "dtype": "float32", "plan": P.split_plan(None, 64, None)},
        {"m": 8, "n": 128, "k": 256, "dtype": "bfloat16", "plan": P.split_plan(None, None, 64)},
        {"m": 4, "n": 64, "k": 64, "dtype": "float32", "plan": {"kind": "native"}},
        {"m": 1, "n": 64, "k": 64, "dtype": "float32", "plan": kernel},
    ]
    r = loaded.call(60, "shapes", items=items, pairs=3, warmup=1)["result"]["items"]
    for got, want in zip(r[:3], items):
        assert (got["m"], got["n"], got["k"], got["dtype"], got["plan"]) == tuple(
            want[f] for f in ("m", "n", "k", "dtype", "plan")
        )
        assert got["correct"] is True and got["error"] is None, got
        assert len(got["native_s"]) == len(got["plan_s"]) == 3
        assert got["lo"] <= got["ratio"] <= got["hi"] and got["plan_hash"].startswith("sha256:")
    assert r[0]["rel_err"] < 1e-5 and r[1]["rel_err"] < 3e-2
    assert r[3]["correct"] is False and r[3]["error"] and r[3]["native_s"] == []


def tabulated(model, source, **kw):
    target = {"device": "dev-test", "model": models.fingerprint(model), "mlx": "0.32.4", "backend": "cpu"}
    return tabulate.tabulate(source, models.model_shapes(model), device_info={"backend": "cpu"}, target=target, **kw)


def test_tabulate_runs_choose_tile_size_out_of_process(tiny):
    """The plugin's path for a user's own OpenEvolve program (never an endpoint's code)."""
    model, _, info = tiny
    doc = P.validate(tabulated(model, SOURCE, m_values=[1, 16]))
    assert doc["target"]["device"] == "dev-test" and doc["target"]["model"] == info["model_fingerprint"]
    assert P.plan_for(doc, 1, 1024, 64) == {"kind": "native"}
    assert P.plan_for(doc, 20, 1024, 64) == P.split_plan(None, 64, 32)
    assert P.plan_for(doc, 20, 64, 128) == P.split_plan(None, None, 32)
    assert P.plan_for(doc, 20, 32, 64) == P.split_plan(None, None, 32)


TABULATE_FAILURES = [
    ("def choose_tile_size(M, N, K, d):\n    while True: pass\n", 1.5, "did not finish"),
    ("def choose_tile_size(M, N, K, d)\n", 10, "SyntaxError"),
    ("x = 1\n", 10, "does not define choose_tile_size"),
    ("def choose_tile_size(M, N, K, d):\n    return (0, None, None)\n", 10, "tile_m must be"),
    ("def choose_tile_size(M, N, K, d):\n    return 'big'\n", 10, "expected (tile_m, tile_n, tile_k)"),
    ("import os\ndef choose_tile_size(M, N, K, d):\n    os._exit(9)\n", 10, "exit 9"),
    ("def choose_tile_size(M, N, K, d):\n    return bytearray(8 << 30)\n", 10, "MemoryError"),
]


@pytest.mark.parametrize("source,limit,message", TABULATE_FAILURES)
def test_tabulate_failures_are_errors(tiny, source, limit, message):
    with pytest.raises(tabulate.TabulateError, match=re.escape(message)):
        tabulated(tiny[0], source, time_limit_s=limit)


@pytest.mark.parametrize("via", ["field", "env"])
def test_fault_crash_and_garbage(tiny, via):
    env = {"TILEWISE_WORKER_FAULT": "ping:garbage"} if via == "env" else None
    w = Worker(env=env)
    try:
        w.send({"id": 1, "op": "ping", **({"inject_fault": "garbage"} if via == "field" else {})})
        assert w.next_line().strip() == "this line is not JSON {{{"
        assert w.next_json() == {"id": 1, "type": "result", "result": {"pong": True}}
        w.send({"id": 2, "op": "ping", "inject_fault": "crash"})
        assert w.proc.wait(timeout=30) == 3
    finally:
        w.close()


def test_fault_hang(tiny):
    w = Worker(env={"TILEWISE_WORKER_FAULT": "load:hang"})
    try:
        w.send({"id": 1, "op": "load", "model": "synthetic:tiny"})
        with pytest.raises(queue.Empty):
            w.next_line(timeout=3)
        assert w.proc.poll() is None  # still hanging: the daemon's timeout must kill it
    finally:
        w.close()


def test_fault_oom_dies_safely(tiny):
    w = Worker()
    try:
        t = time.monotonic()
        w.send({"id": 1, "op": "ping", "inject_fault": "oom"})
        assert w.proc.wait(timeout=60) == -signal.SIGKILL
        assert time.monotonic() - t < 60
        assert b"out of memory after" in w.proc.stderr.read()
    finally:
        w.close()


def test_unknown_fault_is_a_bad_request(worker):
    assert error_code(worker.call(1, "ping", inject_fault="meteor")) == "bad_request"


def test_closing_stdin_ends_the_worker(worker):
    worker.proc.stdin.close()
    assert worker.proc.wait(timeout=30) == 0


def test_evaluate_race_stops_losers_early_and_reports_it(loaded):
    # Against a bar of 100x every candidate is a loser: each workload stops at min_pairs.
    r = loaded.call(60, "evaluate", policy=P.native(), pairs=6, warmup=0, race={"bar": 100.0, "min_pairs": 2}, **SMALL)[
        "result"
    ]
    assert r["inference"]["n_pairs"] == 2 and r["training"]["n_pairs"] == 2
    assert r["inference"]["stopped_early"] and len(r["training"]["samples"]) == 4
    assert r["race"]["stopped_early"] is True and r["race"]["stopped_in"] == "inference"
    assert r["race"]["pairs_taken"] == {"inference": 2, "training": 2}
    # Against a bar no ratio is under, every pair is run.
    r = loaded.call(61, "evaluate", policy=P.native(), pairs=3, warmup=0, race={"bar": 0.001}, **SMALL)["result"]
    assert r["inference"]["n_pairs"] == 3 and r["training"]["n_pairs"] == 3
    assert r["race"]["stopped_early"] is False
    # Without `race` nothing is raced and the result has no race field.
    r = loaded.call(62, "evaluate", policy=P.native(), pairs=2, warmup=0, **SMALL)["result"]
    assert "race" not in r and r["inference"]["stopped_early"] is False


def test_evaluate_bad_race_fields(loaded):
    for race in ("fast", {"min_pairs": 1}, {"bar": -1}, {"patience": 3}):
        assert error_code(loaded.call(70, "evaluate", policy=P.native(), race=race, **SMALL)) == "bad_request"
    assert loaded.call(71, "ping")["result"] == {"pong": True}
