"""The plugin's usage record: what it derives from forward calls, that it never carries prompt text
or token ids, and that a real daemon stores it (and the fetch) for `tilewise models` / `status`."""

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlx.core as mx
import pytest

from tilewise import daemon_client, models, usage

REPO = Path(__file__).resolve().parents[2]
EVALUATOR = REPO / "evaluator"

#: Every field a report may carry; anything else would be a leak.
REPORT_FIELDS = {"model", "model_name", "period_s", "generations", "shapes"}
GENERATION_FIELDS = {"batch", "prompt_tokens", "generated_tokens", "prefill_step", "count"}
SHAPE_FIELDS = {"m", "n", "k", "calls"}


def shapes_of_tiny():
    return [{"n": 64, "k": 64, "count": 4}, {"n": 256, "k": 64, "count": 2}]


def test_forwards_become_generation_kinds_and_shapes():
    u = usage.ModelUsage("mdl-x", "org/x", shapes_of_tiny())
    # a batch-8 server request: prompt of 300 tokens prefilled in chunks of 128, 20 tokens generated
    for length in (128, 128, 44):
        u.forward(8, length, training=False)
    for _ in range(20):
        u.forward(8, 1, training=False)
    # then a single-sequence generate with a 5-token prompt and 3 tokens
    u.forward(1, 5, training=False)
    for _ in range(3):
        u.forward(1, 1, training=False)
    u.forward(4, 64, training=True)  # a training step: shapes only
    r = u.take()
    gens = {
        (g["batch"], g["prompt_tokens"], g["generated_tokens"], g.get("prefill_step")): g["count"]
        for g in r["generations"]
    }
    assert gens == {(8, 256, 16, 128): 1, (1, 4, 2, None): 1}, gens
    shapes = {(s["m"], s["n"], s["k"]): s["calls"] for s in r["shapes"]}
    assert shapes[(1024, 64, 64)] == 2 * 4  # two forwards of 8 x 128 tokens, 4 layers of 64x64
    assert shapes[(8, 256, 64)] == 20 * 2
    assert shapes[(256, 64, 64)] == 4 + 4, "the last chunk's M = 8 x 44 and the training step's 4 x 64, both in 256"
    assert u.take() is None, "a report empties the record"


def test_a_report_holds_sizes_and_counts_never_token_ids(tiny_dir_for_usage):
    import mlx_lm

    model, _ = mlx_lm.load(str(tiny_dir_for_usage))
    fp = models.fingerprint(model)
    rec = usage.Recorder()
    old = usage._recorder
    usage._recorder = rec
    try:
        assert usage.watch(model, fp, "my-model", models.model_shapes(model))
        # distinctive token ids: none of them may appear anywhere in a report
        secret = [1777, 1999, 1237, 1531, 1103, 1901, 1447]
        from mlx_lm.generate import generate_step

        for _ in zip(range(6), generate_step(mx.array(secret, dtype=mx.int32), model, max_tokens=6)):
            pass
        reports = rec.take_reports()
    finally:
        usage.unwatch(model)
        usage._recorder = old
    assert len(reports) == 1
    r = reports[0]
    assert set(r) <= REPORT_FIELDS, set(r) - REPORT_FIELDS
    assert all(set(g) <= GENERATION_FIELDS for g in r["generations"])
    assert all(set(s) <= SHAPE_FIELDS for s in r["shapes"])
    assert r["generations"][0]["batch"] == 1 and r["generations"][0]["prompt_tokens"] == 4  # 7 -> bucket 4
    numbers = set()

    def walk(v):
        if isinstance(v, dict):
            for x in v.values():
                walk(x)
        elif isinstance(v, list):
            for x in v:
                walk(x)
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            numbers.add(v)
        else:
            assert isinstance(v, str) and v in (fp, "my-model"), v

    walk(r)
    assert not numbers & set(secret), numbers & set(secret)
    assert type(model).__name__ == "Model" and not hasattr(type(model), "_tilewise_usage_original")


@pytest.fixture(scope="module")
def tiny_dir_for_usage(models_dir):
    return models.synthesize("tiny")


# ---------------------------------------------------------------------------------------------
# Against the real daemon

USER_PROGRAM = r"""
import sys
import mlx.core as mx
import mlx_lm
import tilewise
from mlx_lm.models.cache import make_prompt_cache
tilewise.enable_optimizations()
model, tok = mlx_lm.load(sys.argv[1])
# what a batching server does: 8 prompts of 100 tokens, then 12 decode steps of the batch
for request in range(3):
    cache = make_prompt_cache(model)
    logits = model(mx.zeros((8, 100), dtype=mx.int32), cache=cache)
    for _ in range(12):
        logits = model(mx.argmax(logits[:, -1:], axis=-1), cache=cache)
    mx.eval(logits)
print("done")
"""


@pytest.fixture(scope="module")
def daemon_binary():
    build = subprocess.run(
        ["cargo", "build", "--locked", "-q", "-p", "tilewise", "--bin", "tilewised"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert build.returncode == 0, build.stderr[-3000:]
    return REPO / "target" / "debug" / "tilewised"


def test_the_daemon_stores_what_a_batching_process_ran_and_who_fetched(daemon_binary, tiny_dir_for_usage):
    home = Path(tempfile.mkdtemp(prefix="tw-usage-"))
    try:
        with daemon_client.LocalDaemon(daemon_binary, home) as d:
            env = dict(os.environ, TILEWISE_HOME=str(home), TILEWISE_PLUGIN_TIMEOUT_S="5")
            env.pop("TILEWISE_SOCKET", None)
            out = subprocess.run(
                [sys.executable, "-c", USER_PROGRAM, str(tiny_dir_for_usage)],
                cwd=EVALUATOR,
                env=env,
                capture_output=True,
                text=True,
                timeout=300,
            )
            assert out.returncode == 0, out.stderr[-3000:]
            pid_gone = out  # the process has exited: its report was sent at exit
            with d.client(timeout=10) as c:
                c.hello()
                deadline = time.time() + 20
                while True:
                    listed = c.call("models.list", {})["models"]
                    used = [m for m in listed if m["usage"]["reports"] > 0]
                    if used or time.time() > deadline:
                        break
                    time.sleep(0.2)
                clients = c.call("clients.list", {})["clients"]
        assert pid_gone.returncode == 0
        assert len(used) == 1, json.dumps(listed, indent=1)
        m = used[0]
        assert m["name"] == str(tiny_dir_for_usage)
        assert m["usage"]["main_batch"] == 8, m
        assert m["usage"]["generations"] == 3 and m["dtype"] == "float32", m
        plugin_fetches = [c for c in clients if c["client"].startswith("tilewise-py/")]
        assert len(plugin_fetches) == 1, clients
        f = plugin_fetches[0]
        assert (f["model"], f["source"], f["live"]) == (m["fingerprint"], "native", False), f
        assert f["pid"] and f["pid"] != os.getpid()
    finally:
        import shutil

        shutil.rmtree(home, ignore_errors=True)
