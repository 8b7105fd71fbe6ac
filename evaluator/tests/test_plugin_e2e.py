"""End to end: the real `tilewised` (in a temp TILEWISE_HOME) holds a best policy written through the
store (daemon/examples/seed_best.rs -> Store::promote); separate Python processes, like a user's,
enable the plugin, load the tiny model with mlx_lm.load, generate, and report tilewise.status().

The story: daemon up -> the stored policy is applied (calls counted per plan kind) and cached;
daemon stopped -> the cached policy; cache removed -> native with exactly one warning.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import pytest

from tilewise import daemon_client, workloads
from tilewise import policy as P

REPO = Path(__file__).resolve().parents[2]
EVALUATOR = REPO / "evaluator"

USER_PROGRAM = r"""
import json, sys, warnings
warnings.simplefilter("always")
import mlx_lm
import tilewise
tilewise.enable_optimizations()
model, tok = mlx_lm.load(sys.argv[1])
text = mlx_lm.generate(model, tok, "hello world", max_tokens=5)
streamed = "".join(r.text for r in mlx_lm.stream_generate(model, tok, "hello world", max_tokens=5))
st = tilewise.status()
print(str(st), file=sys.stderr)
print(json.dumps({"status": st.as_dict(), "text": text, "streamed": streamed}))
"""


@pytest.fixture(scope="module")
def binaries():
    """tilewised and the seed_best example of this checkout, built if needed (cargo is incremental)."""
    build = subprocess.run(
        ["cargo", "build", "--locked", "-q", "-p", "tilewise", "--bin", "tilewised", "--example", "seed_best"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert build.returncode == 0, f"cannot build the daemon for the e2e test:\n{build.stderr[-3000:]}"
    return {
        "daemon": REPO / "target" / "debug" / "tilewised",
        "seed_best": REPO / "target" / "debug" / "examples" / "seed_best",
    }


@pytest.fixture
def home(tmp_path):
    # AF_UNIX paths are limited to ~104 bytes: keep the home short.
    import tempfile

    d = Path(tempfile.mkdtemp(prefix="tw-e2e-"))
    yield d
    import shutil

    shutil.rmtree(d, ignore_errors=True)


def run_user(home, model_dir, *, timeout=180):
    # a generous daemon budget: CI machines can be loaded far beyond what the 200 ms default assumes
    # (test_plugin.py shows the default bounds a silent daemon's cost)
    env = dict(os.environ, TILEWISE_HOME=str(home), TILEWISE_PLUGIN_TIMEOUT_S="5")
    env.pop("TILEWISE_SOCKET", None)
    out = subprocess.run(
        [sys.executable, "-c", USER_PROGRAM, str(model_dir)],
        cwd=EVALUATOR,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["warnings"] = out.stderr.count("TilewiseWarning")
    result["stderr"] = out.stderr
    return result


def seed_best(binaries, home, doc, ratio=1.07):
    path = home / "best.json"
    path.write_text(json.dumps(doc))
    env = dict(os.environ, TILEWISE_HOME=str(home))
    out = subprocess.run(
        [str(binaries["seed_best"]), str(path), "--ratio", str(ratio), "--lo", "1.03", "--hi", "1.1"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)["hash"]


def best_policy(device, model_fp, name="e2e best"):
    """q_proj/o_proj (N = K = 64) native at M = 1 and split along N at larger M; the tied head
    (N = vocab 1024) split along N always; the rest native (those layers stay stock). All splits are
    along N, so outputs are exact. 2 x 2 + 1 = 5 layers patched."""
    target = {"device": device, "model": model_fp, "mlx": mx.__version__, "backend": workloads.backend()}
    return P.make_policy(
        [
            {"m": [1, 1], "n": [64, 64], "k": [64, 64], "plan": {"kind": "native"}},
            {"n": [64, 64], "k": [64, 64], "plan": P.split_plan(None, 32, None)},
            {"n": [1000, None], "plan": P.split_plan(None, 256, None)},
        ],
        target=target,
        name=name,
    )


def test_daemon_then_cache_then_native(binaries, home, tiny):
    model, _, info = tiny
    model_dir = info["model_path"]
    with daemon_client.LocalDaemon(binaries["daemon"], home) as d:
        assert d.device_fingerprint, d.status
        doc = best_policy(d.device_fingerprint, info["model_fingerprint"])
        stored_hash = seed_best(binaries, home, doc)
        assert stored_hash == P.content_hash(doc)

        # 1. daemon up: its stored best is applied
        r = run_user(home, model_dir)
        m = r["status"]["models"][0]
        assert m["source"] == "daemon", m["reason"]
        assert m["policy_hash"] == stored_hash and m["patched_layers"] == 5
        assert m["evidence"]["ratio"] == pytest.approx(1.07)
        calls = r["status"]["calls"]
        # prefill: q/o (4) and the head split; decode steps: q/o native (4), the head split
        assert calls["split"] > 0 and calls["native"] > 0 and calls["native"] % 4 == 0, calls
        assert calls["kernel"] == 0
        assert r["text"] == r["streamed"] and r["warnings"] == 0
        cached = list((home / "cache" / "policies").glob("*.json"))
        assert len(cached) == 1 and json.loads(cached[0].read_text())["hash"] == stored_hash
        assert d.stop() == 0

    # 2. daemon stopped: the cached policy, with one warning saying so
    r2 = run_user(home, model_dir)
    m2 = r2["status"]["models"][0]
    assert m2["source"] == "cache" and m2["policy_hash"] == stored_hash, m2["reason"]
    assert r2["status"]["calls"] == calls
    assert r2["text"] == r["text"] and r2["warnings"] == 1

    # 3. no daemon, no cache: native, model stock, exactly one warning
    cached[0].unlink()
    r3 = run_user(home, model_dir)
    m3 = r3["status"]["models"][0]
    assert m3["source"] == "native" and m3["policy_hash"] is None and m3["patched_layers"] == 0
    assert r3["status"]["calls"] == {"native": 0, "split": 0, "kernel": 0}
    assert r3["warnings"] == 1 and "daemon not running" in r3["status"]["warning"]
    assert r3["text"] == r["text"]  # the split along N is exact: same tokens as with the policy


def test_nothing_proven_yet_is_native_without_a_warning(binaries, home, tiny):
    _, _, info = tiny
    with daemon_client.LocalDaemon(binaries["daemon"], home):
        r = run_user(home, info["model_path"])
    m = r["status"]["models"][0]
    assert m["source"] == "daemon" and m["patched_layers"] == 0, m
    assert r["warnings"] == 0 and r["status"]["calls"] == {"native": 0, "split": 0, "kernel": 0}


def test_a_new_promotion_reaches_the_next_process_and_replaces_the_cache(binaries, home, tiny):
    _, _, info = tiny
    with daemon_client.LocalDaemon(binaries["daemon"], home) as d:
        first = seed_best(binaries, home, best_policy(d.device_fingerprint, info["model_fingerprint"], "first"))
        assert run_user(home, info["model_path"])["status"]["models"][0]["policy_hash"] == first
        doc2 = P.make_policy(
            [{"m": [1, 1], "plan": P.split_plan(None, 512, None)}],
            target=best_policy(d.device_fingerprint, info["model_fingerprint"])["target"],
            name="second",
        )
        second = seed_best(binaries, home, doc2, ratio=1.12)
        r = run_user(home, info["model_path"])
    m = r["status"]["models"][0]
    assert second != first and m["policy_hash"] == second and m["policy_name"] == "second"
    entry = json.loads(next((home / "cache" / "policies").glob("*.json")).read_text())
    assert entry["hash"] == second and entry["device_fingerprint"] == d.device_fingerprint


def test_cli_wrapper_gets_the_daemons_policy(binaries, home, tiny):
    _, _, info = tiny
    with daemon_client.LocalDaemon(binaries["daemon"], home) as d:
        stored = seed_best(binaries, home, best_policy(d.device_fingerprint, info["model_fingerprint"]))
        env = dict(os.environ, TILEWISE_HOME=str(home))
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "tilewise.mlx_lm",
                "--timeout",
                "5",
                "generate",
                "--model",
                info["model_path"],
                "--prompt",
                "hello",
                "--max-tokens",
                "4",
            ],
            cwd=EVALUATOR,
            env=env,
            capture_output=True,
            text=True,
            timeout=180,
        )
    assert out.returncode == 0, out.stderr
    assert f"tilewise: daemon, policy {stored}, 5 layers patched" in out.stderr
    assert "Generation:" in out.stdout


#: 1-minute load average per core above which a 5 % effect is not resolvable by a session (the
#: suite alone keeps it near 1; the suite beside a release build, ~2.3).
OVERSUBSCRIBED = 1.75
#: Half-width of a measurement's 95 % interval at or above which a ~5 % effect cannot be resolved (a
#: quiet 2-core box measures the fusion seed at 0.012-0.018).
UNRESOLVED_HALFWIDTH = 0.04


def _figure(m):
    """'ratio [lo, hi]' of a session.show measurement (None figures when it was not timed)."""
    if m.get("ratio") is None or m.get("lo") is None:
        return "not timed"
    return f"{m['ratio']:.3f} [{m['lo']:.3f}, {m['hi']:.3f}]"


def run_session(d, info, seed, budget=12, timeout_s=900, **settings):
    """Runs one tuning session with default settings (budget, seed and `settings` aside) to its end;
    returns (policy.get's answer for the tiny model, session.show)."""
    with d.client(timeout=60) as c:
        c.hello()
        started = c.call("tuning.start", {"budget": {"evaluations": budget}, "seed": seed, "now": True, **settings})
    deadline = time.monotonic() + timeout_s
    while True:
        with d.client(timeout=30) as c:
            tuning = c.status()["tuning"]
        if tuning["state"] == "idle":
            break
        assert time.monotonic() < deadline, f"session {started['session_id']} did not finish in {timeout_s} s"
        time.sleep(1)
    with d.client(timeout=30) as c:
        session = c.call("session.show", {"session_id": started["session_id"]})
        answer = c.policy_get(info["model_fingerprint"], mx.__version__, workloads.backend())
    return answer, session


def test_a_default_session_finds_fusion_and_mlx_lm_processes_get_it(binaries, home, tiny):
    """From search to user: a tuning session with default settings (budget aside) on the default CPU
    model promotes a fusion policy by itself, and a separate mlx_lm process runs it fused, with the
    same generated text as stock. On a box that cannot resolve a 5 % effect (oversubscribed through
    every try, or every fusion measurement wider than `UNRESOLVED_HALFWIDTH`) it checks that the
    fusion was measured correct and skips with the figures."""
    _, _, info = tiny
    env = dict(os.environ, TILEWISE_PYTHON=sys.executable)
    with daemon_client.LocalDaemon(binaries["daemon"], home, env=env) as d:
        # The combined effect is ~4-6 % on a quiet box, where the first (default) session promotes.
        # When other processes keep both cores busy it shrinks while the noise grows, and a
        # promotion (two independent measurements with lower bounds above 1) is no longer likely.
        # So the later tries keep the default search but measure what fusion speeds up most
        # (decode: +7 % quiet) with twice the pairs, which proves it under moderate load.
        decode = {"pairs": 20, "workload": {"inference": {"prompt_tokens": 16, "gen_tokens": 48}}, "budget": 6}
        tried, loads, fused, per_try = [], [], [], []
        for seed, settings in ((3, {}), (4, decode), (5, decode)):
            answer, session = run_session(d, info, seed, **settings)
            loads.append(os.getloadavg()[0] / (os.cpu_count() or 1))
            measured = [(c["origin"], c.get("measurement")) for c in session.get("candidates", [])]
            state = session.get("session") or {}
            outline = ", ".join(
                f"{c['origin']}:{c['status']}" + (f" ({c['failure_reason']})" if c.get("failure_reason") else "")
                for c in session.get("candidates", [])[:4]
            )
            tried.append(
                (
                    answer["reason"],
                    settings,
                    f"session {state.get('state')} ({state.get('reason')}), "
                    f"{len(session.get('candidates', []))} candidates: {outline}",
                    measured[:6],
                )
            )
            # A later session of the same target may go on from the saved search instead of seeding.
            per_try.append([m for origin, m in measured if origin == "seed:fuse-siblings" and m])
            fused += per_try[-1]
            if answer["source"] == "best":
                break
        if answer["source"] != "best":
            figures = "; ".join(
                f"{(why or '')[:60]} | load {load:.1f}/core | {what} | fusion seed "
                + (", ".join(_figure(m) for m in seed_measurements) or "not measured in this session")
                for why, what, load, seed_measurements in zip(
                    (t[0] for t in tried), (t[2] for t in tried), loads, per_try
                )
            )
            assert fused and all(m["correct"] for m in fused), f"the fusion seed must be measured, correct: {figures}"
            # A box whose noise hides a 5 % effect cannot prove it, and refusing is then the rule
            # working: beside a release build (~2.3 runnable per core) pairs swing by tens of percent
            # and 120 pairs left the fusion at 1.10 [1.00, 1.14]. Two signs of such a box, either
            # enough: every try ran oversubscribed by the load average (which lags the build's
            # phases), or every measurement of the fusion seed came out wider than a quiet box ever
            # gives (there: half-width 0.012-0.018, tune-fusion and remeasure results in results/cpu).
            # On a box that resolved the effect no promotion is a failure.
            unresolved = all(m["lo"] is not None and (m["hi"] - m["lo"]) / 2 >= UNRESOLVED_HALFWIDTH for m in fused)
            if min(loads) >= OVERSUBSCRIBED or unresolved:
                pytest.skip(f"this box could not resolve a 5 % effect: {figures}")
            pytest.fail(f"no session promoted the fusion on a box that resolved it: {figures}")
        policy = answer["policy"] if isinstance(answer["policy"], dict) else json.loads(answer["policy"])
        assert P.fusion_groups(policy), policy
        assert answer["evidence"]["lo"] > 1.0
        # The promotion was made final by a re-measurement in a fresh worker process.
        with d.client(timeout=30) as c:
            history = c.call("history", {})["promotions"]
        kinds = [(h["kind"], h["hash"], h.get("reason")) for h in history]
        assert ("remeasure", answer["hash"], "in a fresh worker process after its promotion") in kinds, kinds
        r = run_user(home, info["model_path"])
    m = r["status"]["models"][0]
    assert m["source"] == "daemon" and m["policy_hash"] == answer["hash"], m["reason"]
    assert m["fusion"]["instances"] > 0 and m["fusion"]["matmuls_per_token"][1] < 15, m["fusion"]
    stock = subprocess.run(
        [sys.executable, "-c", USER_PROGRAM.replace("tilewise.enable_optimizations()", ""), info["model_path"]],
        cwd=EVALUATOR,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert stock.returncode == 0, stock.stderr[-2000:]
    assert json.loads(stock.stdout.strip().splitlines()[-1])["text"] == r["text"]
