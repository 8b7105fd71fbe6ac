"""The plugin without a daemon: policy files (good, bad, foreign, corrupt), the disk cache, the
client's deadline against a daemon that is slow or talks garbage, the mlx_lm.load hook, and the
command-line wrapper. The real-daemon end-to-end runs are in test_plugin_e2e.py."""

import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import warnings
from pathlib import Path

import mlx.core as mx
import pytest

from tilewise import daemon_client, fusion, models, patch, plugin, workloads
from tilewise import policy as P

EVALUATOR = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def fresh_plugin(tmp_path, monkeypatch):
    """Each test: its own TILEWISE_HOME, no daemon, the plugin off and its warning flag cleared."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("TILEWISE_HOME", str(home))
    for var in ("TILEWISE_SOCKET", "TILEWISE_POLICY_CACHE_MAX_AGE_S", "TILEWISE_PLUGIN_TIMEOUT_S"):
        monkeypatch.delenv(var, raising=False)
    plugin._reset_for_tests()
    yield home
    plugin._reset_for_tests()


@pytest.fixture(scope="module")
def tiny_dir(models_dir):
    return models.synthesize("tiny")


def load_tiny(tiny_dir):
    import mlx_lm

    return mlx_lm.load(str(tiny_dir))


def target_of(model, **over):
    t = {"device": "*", "model": models.fingerprint(model), "mlx": mx.__version__, "backend": workloads.backend()}
    t.update(over)
    return t


def split_head_policy(target, name="split head"):
    """Splits the output head (N = vocab 1024) along N: exact, and visible in the call counts."""
    return P.make_policy([{"n": [1024, None], "plan": P.split_plan(None, 256, None)}], target=target, name=name)


def mixed_policy(target, name="mixed"):
    """q_proj/o_proj (N = K = 64): native at M = 1 (decode), split along N at larger M (prefill);
    the head (N = vocab 1024) split along N always; everything else native. All splits are along N,
    so outputs are exact. Patches 2 x 2 + 1 = 5 layers."""
    return P.make_policy(
        [
            {"m": [1, 1], "n": [64, 64], "k": [64, 64], "plan": {"kind": "native"}},
            {"n": [64, 64], "k": [64, 64], "plan": P.split_plan(None, 32, None)},
            {"n": [1024, None], "plan": P.split_plan(None, 256, None)},
        ],
        target=target,
        name=name,
    )


def write_json(path, doc):
    path.write_text(json.dumps(doc))
    return path


def tilewise_warnings(record):
    return [w for w in record if issubclass(w.category, plugin.TilewiseWarning)]


def is_patched(model):
    return patch.applied_policy(model) is not None


# ---------------------------------------------------------------------------------------------
# where the daemon is


def test_socket_path_follows_the_protocol_table():
    sp = daemon_client.socket_path
    assert sp({"TILEWISE_SOCKET": "/s/x.sock", "TILEWISE_HOME": "/h"}) == Path("/s/x.sock")
    assert sp({"TILEWISE_HOME": "/h", "XDG_RUNTIME_DIR": "/run/user/1"}) == Path("/h/run/tilewised.sock")
    if sys.platform != "darwin":
        assert sp({"XDG_RUNTIME_DIR": "/run/user/1"}) == Path("/run/user/1/tilewise/tilewised.sock")
        assert sp({"XDG_DATA_HOME": "/d"}) == Path("/d/tilewise/run/tilewised.sock")
    assert daemon_client.cache_dir({"TILEWISE_HOME": "/h"}) == Path("/h/cache")


# ---------------------------------------------------------------------------------------------
# no daemon


def test_no_daemon_no_cache_gives_native_and_exactly_one_warning(tiny_dir):
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        plugin.enable_optimizations()
        m1, _ = load_tiny(tiny_dir)
        m2, _ = load_tiny(tiny_dir)
    ws = tilewise_warnings(rec)
    assert len(ws) == 1, [str(w.message) for w in ws]
    assert "daemon not running" in str(ws[0].message) and "using native" in str(ws[0].message)
    assert ws[0].filename == __file__, "the warning should point at the user's mlx_lm.load line"
    st = plugin.status()
    assert [r.source for r in st.models] == ["native", "native"]
    assert not is_patched(m1) and not is_patched(m2)
    assert "daemon not running" in str(st)


def test_explicit_model_and_apply_to(tiny_dir, tmp_path):
    import mlx_lm.utils

    stock_load = mlx_lm.utils.load
    model, _ = mlx_lm.utils.load(str(tiny_dir))  # loaded before enabling: the hook does not see it
    doc = split_head_policy(target_of(model))
    path = write_json(tmp_path / "p.json", doc)
    st = plugin.enable_optimizations(path, model=model)
    assert st.models[-1].source == "file" and st.models[-1].policy_hash == P.content_hash(doc)
    assert is_patched(model) and st.models[-1].patched_layers == 1  # only the head can leave native
    plugin.disable()
    assert not is_patched(model) and mlx_lm.utils.load is stock_load
    rec = plugin.apply_to(model, path)  # one model, no hook
    assert rec.source == "file" and is_patched(model)
    patch.remove(model)


def test_load_hook_covers_every_name_mlx_lm_imported(tiny_dir):
    import mlx_lm.generate
    import mlx_lm.server
    import mlx_lm.utils

    # (`mlx_lm.generate` the attribute is the function; the modules are in sys.modules)
    mods = [sys.modules[n] for n in ("mlx_lm", "mlx_lm.generate", "mlx_lm.server", "mlx_lm.utils")]
    stock_step = sys.modules["mlx_lm.generate"].generate_step
    stock = mlx_lm.utils.load
    assert all(mod.load is stock for mod in mods)
    plugin.enable_optimizations()
    for mod in mods:
        assert mod.load is not stock and mod.load._tilewise_original is stock, mod.__name__
    import mlx_lm.chat  # imported after enabling: picks the wrapper up from mlx_lm.utils

    assert mlx_lm.chat.load is mlx_lm.utils.load
    plugin.enable_optimizations()  # twice: not wrapped twice
    assert mlx_lm.utils.load._tilewise_original is stock
    assert sys.modules["mlx_lm.generate"].generate_step._tilewise_original is stock_step
    plugin.disable()
    for mod in mods:
        assert mod.load is stock, mod.__name__
    assert sys.modules["mlx_lm.generate"].generate_step is stock_step


# ---------------------------------------------------------------------------------------------
# policy files


def test_policy_file_is_applied_and_generation_matches_stock(tiny_dir, tmp_path):
    import mlx_lm

    stock_model, tok = load_tiny(tiny_dir)
    stock_text = mlx_lm.generate(stock_model, tok, "hello world", max_tokens=6)
    path = write_json(tmp_path / "p.json", split_head_policy(target_of(stock_model)))

    plugin.enable_optimizations(path)
    model, tok = load_tiny(tiny_dir)
    patch.reset_call_counts()
    text = mlx_lm.generate(model, tok, "hello world", max_tokens=6)
    streamed = "".join(r.text for r in mlx_lm.stream_generate(model, tok, "hello world", max_tokens=6))
    assert text == stock_text == streamed
    calls = plugin.status().calls
    # only the head is patched (the other 14 linears stay stock classes): split on every pass
    assert calls["split"] > 0 and calls["native"] == 0 and calls["kernel"] == 0, calls
    rec = plugin.status().models[-1]
    assert (rec.source, rec.patched_layers, rec.policy_name) == ("file", 1, "split head")


def test_only_layers_a_policy_can_change_are_patched(tiny_dir, tmp_path):
    import mlx_lm

    stock_model, tok = load_tiny(tiny_dir)
    stock_text = mlx_lm.generate(stock_model, tok, "hello world", max_tokens=6)
    plugin.enable_optimizations(write_json(tmp_path / "p.json", mixed_policy(target_of(stock_model))))
    model, tok = load_tiny(tiny_dir)
    patched = sorted(n for n, m in model.named_modules() if type(m) in patch.PATCHED.values())
    assert patched == [
        "model.embed_tokens",
        "model.layers.0.self_attn.o_proj",
        "model.layers.0.self_attn.q_proj",
        "model.layers.1.self_attn.o_proj",
        "model.layers.1.self_attn.q_proj",
    ]
    assert plugin.status().models[-1].patched_layers == 5
    text = str(plugin.status())  # what a user reads
    assert "from file: policy sha256:" in text and "(mixed)" in text and "5 layers patched" in text
    assert f"mlx {mx.__version__}" in text and "why: policy file" in text
    patch.reset_call_counts()
    assert mlx_lm.generate(model, tok, "hello world", max_tokens=6) == stock_text
    calls = plugin.status().calls
    # prefill: q/o split (4) + head split; each decode step: q/o native (4) + head split
    assert calls["native"] > 0 and calls["split"] > 0 and calls["native"] % 4 == 0, calls


@pytest.mark.parametrize(
    "rules, default, expected",
    [
        ([], {"kind": "native"}, False),
        ([], P.split_plan(2, None, None), True),
        ([{"n": [1, 10], "plan": P.split_plan(2, None, None)}], {"kind": "native"}, False),  # other N
        ([{"n": [64, 64], "plan": P.split_plan(2, None, None)}], {"kind": "native"}, True),
        ([{"m": [1, 1], "plan": {"kind": "native"}}], P.split_plan(2, None, None), True),  # M > 1 splits
        ([{"m": [1, None], "plan": {"kind": "native"}}], P.split_plan(2, None, None), False),  # every M native
        ([{"plan": {"kind": "native"}}, {"plan": P.split_plan(2, None, None)}], {"kind": "native"}, False),
        ([{"k": [65, None], "plan": P.split_plan(2, None, None)}], {"kind": "native"}, False),  # other K
    ],
)
def test_may_leave_native(rules, default, expected):
    doc = P.make_policy(rules, default)
    assert P.may_leave_native(doc, 64, 64) is expected


BAD_POLICIES = {
    "schema": (
        lambda t: {
            "schema": "tilewise.policy/1",
            "target": t,
            "matmul": {"rules": [], "default": {"kind": "split", "tile_m": 0, "tile_n": None, "tile_k": None}},
        },
        "matmul.default.tile_m",
    ),
    "unknown plan kind": (
        lambda t: {"schema": "tilewise.policy/1", "target": t, "matmul": {"rules": [], "default": {"kind": "turbo"}}},
        "unknown plan kind",
    ),
    "range lo > hi": (
        lambda t: {
            "schema": "tilewise.policy/1",
            "target": t,
            "matmul": {"rules": [{"m": [9, 3], "plan": {"kind": "native"}}], "default": {"kind": "native"}},
        },
        "lo > hi",
    ),
    "not an object": (lambda t: [1, 2], "policy"),
    "other model": (
        lambda t: split_head_policy(dict(t, model="mdl-00000000000000000000000000000000")),
        "targets model mdl-0000",
    ),
    "other mlx": (lambda t: split_head_policy(dict(t, mlx="0.1.0")), "targets mlx 0.1.0"),
    "other backend": (lambda t: split_head_policy(dict(t, backend="metal")), "policy is for metal"),
    "kernels for another backend": (
        lambda t: P.make_policy(
            [
                {
                    "m": [1, 8],
                    "plan": {
                        "kind": "kernel",
                        "backend": "cuda",
                        "family": "gemv",
                        "rows_per_block": 4,
                        "vector_width": 4,
                        "split_k": 1,
                    },
                }
            ],
            target=dict(t, backend="*"),
        ),
        "kernel backend cuda not available on cpu",
    ),
    "unverifiable device": (lambda t: split_head_policy(dict(t, device="dev-someone-elses")), "fingerprint is unknown"),
}


@pytest.mark.parametrize("case", sorted(BAD_POLICIES))
def test_bad_and_foreign_policy_files_are_refused_with_the_reason(case, tiny_dir, tmp_path):
    make, expected = BAD_POLICIES[case]
    stock_model, _ = load_tiny(tiny_dir)
    path = write_json(tmp_path / "bad.json", make(target_of(stock_model)))
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        plugin.enable_optimizations(path)
        model, _ = load_tiny(tiny_dir)
    r = plugin.status().models[-1]
    assert r.source == "native" and not is_patched(model)
    assert "refused" in r.reason and expected in r.reason, r.reason
    assert len(tilewise_warnings(rec)) == 1


@pytest.mark.parametrize("content", [b"{not json", b"", b"\xff\xfe\x00garbage", b"null"])
def test_corrupt_policy_files_are_refused(content, tiny_dir, tmp_path):
    path = tmp_path / "corrupt.json"
    path.write_bytes(content)
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        plugin.enable_optimizations(path)
        model, _ = load_tiny(tiny_dir)
    r = plugin.status().models[-1]
    assert r.source == "native" and "refused" in r.reason and not is_patched(model)


def test_missing_policy_file_is_native_not_an_exception(tiny_dir, tmp_path):
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        plugin.enable_optimizations(tmp_path / "nope.json")
        model, _ = load_tiny(tiny_dir)
    assert plugin.status().models[-1].source == "native" and not is_patched(model)


def test_device_specific_policy_file_needs_a_known_device(tiny_dir, tmp_path):
    stock_model, _ = load_tiny(tiny_dir)
    path = write_json(tmp_path / "p.json", split_head_policy(target_of(stock_model, device="dev-here")))
    # the last device fingerprint the daemon gave on this host (what _from_daemon records)
    plugin._write_device_file("dev-here")
    plugin.enable_optimizations(path)
    model, _ = load_tiny(tiny_dir)
    assert plugin.status().models[-1].source == "file" and is_patched(model)
    patch.remove(model)
    plugin._write_device_file("dev-elsewhere")
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        model, _ = load_tiny(tiny_dir)
    r = plugin.status().models[-1]
    assert r.source == "native" and "targets device dev-here, this is dev-elsewhere" in r.reason


def test_all_native_policy_leaves_the_model_stock(tiny_dir, tmp_path):
    stock_model, _ = load_tiny(tiny_dir)
    path = write_json(tmp_path / "n.json", P.make_policy(target=target_of(stock_model), name="all native"))
    plugin.enable_optimizations(path)
    model, _ = load_tiny(tiny_dir)
    r = plugin.status().models[-1]
    assert r.source == "file" and r.patched_layers == 0 and not is_patched(model)
    assert "all plans native" in r.reason


# ---------------------------------------------------------------------------------------------
# the cache (what is used when the daemon is away)


def seed_cache(model, doc, device="dev-here", fetched_at=None):
    key = (models.fingerprint(model), mx.__version__, workloads.backend())
    answer = {
        "policy": doc,
        "hash": P.content_hash(doc),
        "source": "best",
        "reason": "proven 1.05x",
        "evidence": {"ratio": 1.05, "lo": 1.02, "hi": 1.08},
    }
    plugin._write_cache(key, device, answer, time.time() if fetched_at is None else fetched_at)
    return plugin.cache_path(key)


def test_valid_cache_is_used_when_the_daemon_is_absent(tiny_dir):
    stock_model, _ = load_tiny(tiny_dir)
    doc = split_head_policy(target_of(stock_model, device="dev-here"))
    seed_cache(stock_model, doc)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        plugin.enable_optimizations()
        model, _ = load_tiny(tiny_dir)
    r = plugin.status().models[-1]
    assert r.source == "cache" and r.policy_hash == P.content_hash(doc) and is_patched(model)
    assert r.evidence["ratio"] == 1.05 and "cached at" in r.reason
    assert len(tilewise_warnings(rec)) == 1


def _tamper(path, fn):
    entry = json.loads(path.read_text())
    fn(entry)
    path.write_text(json.dumps(entry))


CACHE_DEFECTS = {
    "expired": (lambda e: e.update(fetched_at=time.time() - plugin.DEFAULT_CACHE_MAX_AGE_S - 10), "beyond"),
    "other host": (lambda e: e.update(host="0" * 24), "another machine"),
    "tampered policy": (
        lambda e: e["policy"]["matmul"]["default"].update(kind="split", tile_m=2, tile_n=None, tile_k=None),
        "content hash",
    ),
    "policy for another device": (lambda e: e.update(device_fingerprint="dev-other"), "targets device"),
    "wrong key": (lambda e: e["key"].update(mlx="0.0.1"), "another model"),
    "schema-invalid policy": (lambda e: e["policy"].update(schema="nope"), "not usable"),
    "unknown format": (lambda e: e.update(format="x"), "unknown cache format"),
}


@pytest.mark.parametrize("case", sorted(CACHE_DEFECTS))
def test_unusable_cache_falls_back_to_native(case, tiny_dir):
    fn, expected = CACHE_DEFECTS[case]
    stock_model, _ = load_tiny(tiny_dir)
    path = seed_cache(stock_model, split_head_policy(target_of(stock_model, device="dev-here")))
    _tamper(path, fn)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        plugin.enable_optimizations()
        model, _ = load_tiny(tiny_dir)
    r = plugin.status().models[-1]
    assert r.source == "native" and not is_patched(model)
    assert expected in r.reason, r.reason
    assert len(tilewise_warnings(rec)) == 1


@pytest.mark.parametrize("content", [b"{truncated", b"\x00\x01\x02", b"[]"])
def test_corrupt_cache_file_falls_back_to_native(content, tiny_dir):
    stock_model, _ = load_tiny(tiny_dir)
    path = seed_cache(stock_model, split_head_policy(target_of(stock_model, device="dev-here")))
    path.write_bytes(content)
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        plugin.enable_optimizations()
        model, _ = load_tiny(tiny_dir)
    r = plugin.status().models[-1]
    assert r.source == "native" and not is_patched(model) and "cached policy" in r.reason


def test_cache_max_age_is_configurable(tiny_dir, monkeypatch):
    stock_model, _ = load_tiny(tiny_dir)
    seed_cache(stock_model, split_head_policy(target_of(stock_model, device="dev-here")), fetched_at=time.time() - 120)
    monkeypatch.setenv("TILEWISE_POLICY_CACHE_MAX_AGE_S", "60")
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        plugin.enable_optimizations()
        load_tiny(tiny_dir)
    assert plugin.status().models[-1].source == "native"
    monkeypatch.setenv("TILEWISE_POLICY_CACHE_MAX_AGE_S", "600")
    load_tiny(tiny_dir)
    assert plugin.status().models[-1].source == "cache"


# ---------------------------------------------------------------------------------------------
# a daemon that misbehaves (a stand-in socket server: these test the *client's* defences)


class MisbehavingDaemon:
    """Listens at the protocol's socket path and, per connection, does `behaviour`."""

    def __init__(self, path, behaviour):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(path))
        self.sock.listen(8)
        self.behaviour = behaviour
        self.conns = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(conn)
            if self.behaviour == "garbage":
                conn.sendall(b"this is not json\n")
            elif self.behaviour == "huge":
                conn.sendall(b"x" * (daemon_client.MAX_REPLY_LINE + 10))
            elif self.behaviour == "close":
                conn.close()
            # "silent": accept and never answer

    def close(self):
        self.sock.close()
        for c in self.conns:
            c.close()


@pytest.mark.parametrize("behaviour", ["silent", "garbage", "huge", "close"])
def test_misbehaving_daemon_costs_at_most_the_timeout(behaviour, tiny_dir, fresh_plugin):
    stock_model, _ = load_tiny(tiny_dir)
    seed_cache(stock_model, split_head_policy(target_of(stock_model, device="dev-here")))
    server = MisbehavingDaemon(daemon_client.socket_path(), behaviour)
    try:
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            plugin.enable_optimizations(timeout=0.2)
            t0 = time.monotonic()
            r = plugin.apply_to(stock_model)
            elapsed = time.monotonic() - t0
    finally:
        server.close()
        patch.remove(stock_model)
    assert r.source == "cache", r.reason  # the cached policy is used instead
    assert len(tilewise_warnings(rec)) == 1
    # the socket part is bounded by the 0.2 s budget; fingerprinting, cache checks and patching the
    # tiny model take milliseconds (headroom for loaded CI machines; a hang would be unbounded)
    assert elapsed < 2.0, elapsed


def test_client_reads_a_reply_longer_than_the_request_limit():
    """Requests are capped at 64 KiB but replies may run to 16 MiB: `session.show` of a long session
    (every candidate's policy, the shape memo) passed 64 KiB in a loaded CI run and the client gave up."""
    import tempfile

    path = Path(tempfile.mkdtemp(prefix="tw-big-")) / "s.sock"
    big = {"candidates": ["x" * 1000] * (3 * daemon_client.MAX_REQUEST_LINE // 1000)}
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(1)

    def answer():
        conn, _ = server.accept()
        with conn, conn.makefile("rb") as f:
            req = json.loads(f.readline())
            event = {"jsonrpc": "2.0", "method": "event", "params": {"kind": "x"}}
            reply = {"jsonrpc": "2.0", "id": req["id"], "result": big}
            conn.sendall((json.dumps(event) + "\n" + json.dumps(reply) + "\n").encode())

    threading.Thread(target=answer, daemon=True).start()
    try:
        with daemon_client.DaemonClient(path, timeout=30) as c:
            assert c.call("session.show", {"session_id": 1}) == big
    finally:
        server.close()


class AnsweringDaemon(MisbehavingDaemon):
    """Speaks the protocol but serves `answer` (a policy.get result) for any model: lets the tests
    show what the plugin does with a daemon answer it must refuse (the real daemon never serves one:
    it keys its bests by exactly the target the plugin checks)."""

    def __init__(self, path, answer, device="dev-here"):
        self.answer, self.device = answer, device
        super().__init__(path, "answer")

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(conn)
            threading.Thread(target=self._talk, args=(conn,), daemon=True).start()

    def _talk(self, conn):
        results = {
            "hello": {"daemon": "tilewised", "version": "0", "protocol": 1, "pid": os.getpid()},
            "status": {"device_fingerprint": self.device},
            "policy.get": self.answer,
        }
        for line in conn.makefile("rb"):
            req = json.loads(line)
            conn.sendall(
                json.dumps({"jsonrpc": "2.0", "id": req["id"], "result": results[req["method"]]}).encode() + b"\n"
            )


def _answer(doc, **over):
    a = {"policy": doc, "hash": P.content_hash(doc), "source": "best", "reason": "proven", "evidence": None}
    a.update(over)
    return a


DAEMON_ANSWERS = {
    "policy for another model": (
        lambda t: _answer(split_head_policy(dict(t, model="mdl-" + "1" * 32))),
        "targets model mdl-1111",
    ),
    "policy for another device": (
        lambda t: _answer(split_head_policy(dict(t, device="dev-other"))),
        "targets device dev-other, this is dev-here",
    ),
    "policy for another mlx": (lambda t: _answer(split_head_policy(dict(t, mlx="9.9.9"))), "targets mlx 9.9.9"),
    "hash mismatch": (lambda t: _answer(split_head_policy(t), hash="sha256:" + "0" * 64), "content hash"),
    "schema-invalid": (
        lambda t: _answer(
            {"schema": "tilewise.policy/1", "target": t, "matmul": {"rules": "all", "default": {"kind": "native"}}},
            hash=None,
        ),
        "matmul.rules",
    ),
}


@pytest.mark.parametrize("case", sorted(DAEMON_ANSWERS))
def test_a_daemon_answer_that_fails_the_checks_is_refused_and_not_cached(case, tiny_dir):
    make, expected = DAEMON_ANSWERS[case]
    stock_model, _ = load_tiny(tiny_dir)
    good = split_head_policy(target_of(stock_model, device="dev-here"))
    cache_file = seed_cache(stock_model, good)  # an older answer that a refused one must not leave behind
    server = AnsweringDaemon(daemon_client.socket_path(), make(target_of(stock_model, device="dev-here")))
    try:
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            plugin.enable_optimizations(timeout=2.0)
            model, _ = load_tiny(tiny_dir)
    finally:
        server.close()
    r = plugin.status().models[-1]
    assert r.source == "native" and not is_patched(model)
    assert "the daemon's policy was refused" in r.reason and expected in r.reason, r.reason
    assert len(tilewise_warnings(rec)) == 1 and not cache_file.exists()


def test_a_good_daemon_answer_is_applied_and_cached(tiny_dir):
    stock_model, _ = load_tiny(tiny_dir)
    doc = split_head_policy(target_of(stock_model, device="dev-here"))
    server = AnsweringDaemon(daemon_client.socket_path(), _answer(doc))
    try:
        plugin.enable_optimizations(timeout=2.0)
        model, _ = load_tiny(tiny_dir)
    finally:
        server.close()
    r = plugin.status().models[-1]
    assert (r.source, r.policy_hash, r.patched_layers) == ("daemon", P.content_hash(doc), 1)
    key = (r.model_fingerprint, mx.__version__, workloads.backend())
    entry, problem = plugin._read_cache(key)
    assert problem is None and entry["hash"] == P.content_hash(doc) and entry["device_fingerprint"] == "dev-here"


def test_stale_socket_file_is_unavailable_not_an_error(tiny_dir):
    path = daemon_client.socket_path()
    path.parent.mkdir(parents=True)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    s.close()  # the file stays, nobody listens: connect is refused
    with pytest.raises(daemon_client.DaemonUnavailable, match="cannot connect"):
        with daemon_client.DaemonClient(timeout=0.2) as c:
            c.hello()


# ---------------------------------------------------------------------------------------------
# the command line


def run_cli(args, home, timeout=120):
    env = dict(os.environ, TILEWISE_HOME=str(home))
    env.pop("TILEWISE_SOCKET", None)
    return subprocess.run(
        [sys.executable, "-m", "tilewise.mlx_lm", *args],
        cwd=EVALUATOR,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_cli_generate_with_a_policy_file(tiny_dir, tmp_path, fresh_plugin):
    stock_model, _ = load_tiny(tiny_dir)
    path = write_json(tmp_path / "p.json", mixed_policy(target_of(stock_model)))
    gen = ["generate", "--model", str(tiny_dir), "--prompt", "hello", "--max-tokens", "6"]
    stock = subprocess.run([sys.executable, "-m", "mlx_lm", *gen], capture_output=True, text=True, timeout=120)
    out = run_cli(["--policy", str(path), *gen], fresh_plugin)
    assert out.returncode == 0, out.stderr
    assert f"tilewise: file, policy {P.content_hash(json.loads(path.read_text()))}, 5 layers patched" in out.stderr
    # same generated text as stock mlx_lm (the split along N is exact)
    strip = lambda s: s.split("==========")[1]
    assert strip(out.stdout) == strip(stock.stdout)


def test_cli_usage_errors_are_clear(fresh_plugin):
    out = run_cli(["--bogus", "generate"], fresh_plugin)
    assert out.returncode != 0 and "unknown option --bogus" in out.stderr
    out = run_cli([], fresh_plugin)
    assert out.returncode != 0 and "missing the mlx_lm subcommand" in out.stderr


def test_cli_server_serves_with_the_policy(tiny_dir, tmp_path, fresh_plugin):
    stock_model, _ = load_tiny(tiny_dir)
    path = write_json(tmp_path / "p.json", mixed_policy(target_of(stock_model)))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, TILEWISE_HOME=str(fresh_plugin))
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tilewise.mlx_lm",
            "--policy",
            str(path),
            "server",
            "--model",
            str(tiny_dir),
            "--port",
            str(port),
        ],
        cwd=EVALUATOR,
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        # the server loads its model at start; the plugin announces what it applied
        line = ""
        deadline = time.monotonic() + 60
        while "tilewise:" not in line and time.monotonic() < deadline:
            line = proc.stderr.readline()
            assert line or proc.poll() is None, "server exited"
        assert "tilewise: file" in line and "5 layers patched" in line, line
        body = json.dumps({"prompt": "hello", "max_tokens": 4}).encode()
        for _ in range(100):
            try:
                req = urllib.request.Request(
                    f"http://127.0.0.1:{port}/v1/completions", data=body, headers={"Content-Type": "application/json"}
                )
                with urllib.request.urlopen(req, timeout=30) as resp:
                    reply = json.loads(resp.read())
                break
            except (ConnectionError, urllib.error.URLError):
                time.sleep(0.2)
        assert reply["choices"][0]["text"] is not None and reply["usage"]["completion_tokens"] >= 1
    finally:
        proc.terminate()
        proc.wait(timeout=30)


# ---------------------------------------------------------------------------------------------
# OpenEvolve programs (mlx_lm_openevolve.enable_optimizations(path), the seed's integration line)

SPLIT_HEAD_PROGRAM = """
def choose_tile_size(M, N, K, device_info):
    # the shape of an evolved program: consults device_info, splits the big output head along N
    assert device_info["backend"] in ("cpu", "cuda", "metal")
    if N >= 1000:
        return (None, 256, None)
    return None
"""


def test_openevolve_program_is_tabulated_and_applied(tiny_dir, tmp_path):
    import mlx_lm

    import mlx_lm_openevolve

    stock_model, tok = load_tiny(tiny_dir)
    stock_text = mlx_lm.generate(stock_model, tok, "hello world", max_tokens=6)
    program = tmp_path / "best_program.py"
    program.write_text(SPLIT_HEAD_PROGRAM)
    mlx_lm_openevolve.enable_optimizations(str(program))
    model, tok = mlx_lm.load(str(tiny_dir))
    r = mlx_lm_openevolve.status().models[-1]
    assert r.source == "file" and r.patched_layers == 1, r.reason
    assert r.policy_name == "tabulated best_program.py" and "tabulated choose_tile_size" in r.reason
    assert r.target["model"] == models.fingerprint(model) and r.target["device"] == "*"
    patch.reset_call_counts()
    assert mlx_lm.generate(model, tok, "hello world", max_tokens=6) == stock_text
    assert plugin.status().calls["split"] > 0


@pytest.mark.parametrize(
    "program, expected",
    [
        ("def choose_tile_size(M, N, K, device_info):\n    raise RuntimeError('evolved badly')\n", "evolved badly"),
        ("def something_else():\n    pass\n", "does not define choose_tile_size"),
        ("def choose_tile_size(M, N, K, device_info):\n    return 'big'\n", "choose_tile_size"),
        ("this is not python(\n", "SyntaxError"),
    ],
)
def test_broken_openevolve_programs_fall_back_to_native(program, expected, tiny_dir, tmp_path):
    import mlx_lm_openevolve

    path = tmp_path / "best_program.py"
    path.write_text(program)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        mlx_lm_openevolve.enable_optimizations(str(path))
        model, _ = load_tiny(tiny_dir)
    r = plugin.status().models[-1]
    assert r.source == "native" and not is_patched(model) and expected in r.reason, r.reason
    assert len(tilewise_warnings(rec)) == 1


def test_an_unchanged_daemon_answer_does_not_rewrite_the_cache_but_a_changed_one_does(tiny_dir):
    stock_model, _ = load_tiny(tiny_dir)
    doc = split_head_policy(target_of(stock_model, device="dev-here"))
    key = (models.fingerprint(stock_model), mx.__version__, workloads.backend())
    path = seed_cache(stock_model, doc)
    written = path.stat().st_mtime_ns
    time.sleep(0.01)
    plugin._write_cache(
        key,
        "dev-here",
        _answer(doc, reason="proven 1.05x", evidence={"ratio": 1.05, "lo": 1.02, "hi": 1.08}),
        time.time(),
    )
    assert path.stat().st_mtime_ns == written
    _tamper(path, lambda e: e["policy"].update(name="tampered"))  # same hash field, different policy
    plugin._write_cache(
        key,
        "dev-here",
        _answer(doc, reason="proven 1.05x", evidence={"ratio": 1.05, "lo": 1.02, "hi": 1.08}),
        time.time(),
    )
    entry, problem = plugin._read_cache(key)
    assert problem is None and entry["policy"] == doc


def test_a_policys_prefill_step_size_becomes_generate_steps_default(tiny_dir, tmp_path, monkeypatch):
    import mlx_lm

    G = sys.modules["mlx_lm.generate"]  # (mlx_lm.generate the attribute is the function)
    seen = []
    real = G.generate_step

    def spy(prompt, model, *args, **kwargs):  # what reaches mlx_lm's generate_step
        seen.append(kwargs.get("prefill_step_size"))
        return real(prompt, model, *args, **kwargs)

    monkeypatch.setattr(G, "generate_step", spy)  # installed before enabling: the plugin wraps it
    stock_model, tok = load_tiny(tiny_dir)
    doc = split_head_policy(target_of(stock_model))
    doc["generation"] = {"prefill_step_size": 32}
    plugin.enable_optimizations(write_json(tmp_path / "p.json", doc))
    assert G.generate_step._tilewise_original is spy
    model, tok = load_tiny(tiny_dir)
    assert plugin.status().models[-1].prefill_step_size == 32
    mlx_lm.generate(model, tok, "hello", max_tokens=2)  # the policy's default
    mlx_lm.generate(stock_model, tok, "hello", max_tokens=2)  # a model without the policy: untouched
    mlx_lm.generate(model, tok, "hello", max_tokens=2, prefill_step_size=64)  # the caller's choice wins
    assert seen == [32, None, 64]


def test_an_internal_failure_leaves_the_model_stock_and_warns(tiny_dir, tmp_path, monkeypatch):
    stock_model, _ = load_tiny(tiny_dir)
    path = write_json(tmp_path / "p.json", split_head_policy(target_of(stock_model)))

    def broken(*a, **k):
        raise RuntimeError("patching exploded")

    monkeypatch.setattr(plugin, "_patch_reachable_layers", broken)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        plugin.enable_optimizations(path)
        model, _ = load_tiny(tiny_dir)  # no exception reaches the user
    r = plugin.status().models[-1]
    assert r.source == "native" and "RuntimeError: patching exploded" in r.reason and not is_patched(model)
    assert len(tilewise_warnings(rec)) == 1
    assert plugin.apply_to(object()).source == "native"  # not even a model: still no exception


def test_fine_tuning_with_lora_runs_through_the_policy(tiny_dir, tmp_path):
    """mlx_lm's LoRA wraps each patched linear (LoRALinear.linear = our layer): the forward and the
    gradients go through the policy's plans, and (splits along N being exact) match stock."""
    from mlx_lm.tuner.utils import linear_to_lora_layers

    def lora_loss_and_grads(model):
        model.freeze()
        mx.random.seed(0)  # same adapters (lora_a is random) for both models
        linear_to_lora_layers(model, 2, {"rank": 4, "scale": 10.0, "dropout": 0.0})
        for _, m in model.named_modules():  # LoRA's B starts at 0: make the adapters matter
            if hasattr(m, "lora_b"):
                m.lora_b = mx.random.normal(m.lora_b.shape) * 0.01
        return workloads.loss_and_grads(model, workloads.make_batch(model, 2, 16, 1))

    stock_model, _ = load_tiny(tiny_dir)
    path = write_json(tmp_path / "p.json", mixed_policy(target_of(stock_model)))
    stock_loss, stock_grads = lora_loss_and_grads(stock_model)

    plugin.enable_optimizations(path)
    model, _ = load_tiny(tiny_dir)
    patch.reset_call_counts()
    loss, grads = lora_loss_and_grads(model)
    assert isinstance(model.model.layers[0].self_attn.q_proj.linear, patch.TilewiseLinear)
    assert plugin.status().calls["split"] >= 5  # q/o of both layers and the head, at M = 32
    assert mx.allclose(loss, stock_loss, rtol=1e-5).item()
    from mlx.utils import tree_flatten

    g, sg = dict(tree_flatten(grads)), dict(tree_flatten(stock_grads))
    assert g.keys() == sg.keys() and any("lora_a" in k for k in g)
    for k in g:
        assert mx.allclose(g[k], sg[k], rtol=1e-4, atol=1e-6).item(), k


def test_plugin_command_shows_what_would_be_applied(tiny_dir, tmp_path, fresh_plugin):
    stock_model, _ = load_tiny(tiny_dir)
    doc = mixed_policy(target_of(stock_model))
    path = write_json(tmp_path / "p.json", doc)
    env = dict(os.environ, TILEWISE_HOME=str(fresh_plugin))
    out = subprocess.run(
        [sys.executable, "-m", "tilewise.plugin", str(tiny_dir), "--policy", str(path), "--json"],
        cwd=EVALUATOR,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    m = json.loads(out.stdout)["models"][0]
    assert (m["source"], m["policy_hash"], m["patched_layers"]) == ("file", P.content_hash(doc), 5)
    out = subprocess.run(
        [sys.executable, "-m", "tilewise.plugin", str(tiny_dir)],
        cwd=EVALUATOR,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0 and "native (model left stock)" in out.stdout and "daemon not running" in out.stdout


def test_daemon_budget_defaults_and_env(monkeypatch):
    assert plugin.default_timeout_s() == daemon_client.DEFAULT_TIMEOUT_S == 0.2
    monkeypatch.setenv("TILEWISE_PLUGIN_TIMEOUT_S", "1.5")
    assert plugin.enable_optimizations() is not None and plugin._state.timeout == 1.5
    plugin.enable_optimizations(timeout=0.05)
    assert plugin._state.timeout == 0.05
    for bad in ("soon", "-1", "0"):
        monkeypatch.setenv("TILEWISE_PLUGIN_TIMEOUT_S", bad)
        assert plugin.default_timeout_s() == 0.2


def test_quantized_models_get_the_policy_on_the_right_shapes(tiny_dir, tmp_path):
    """(N, K) of packed quantized weights is unpacked before matching rules (K = columns x 32 / bits)."""
    import mlx.nn as nn
    import mlx_lm

    model, tok = load_tiny(tiny_dir)
    nn.quantize(model, group_size=32, bits=4)
    assert patch.layer_nk(model.model.layers[0].self_attn.q_proj) == (64, 64)
    assert patch.layer_nk(model.model.layers[0].mlp.down_proj) == (64, 128)
    stock_text = mlx_lm.generate(model, tok, "hello world", max_tokens=4)
    rec = plugin.apply_to(model, write_json(tmp_path / "p.json", mixed_policy(target_of(model))))
    assert rec.source == "file" and rec.patched_layers == 5, rec.reason
    patch.reset_call_counts()
    assert mlx_lm.generate(model, tok, "hello world", max_tokens=4) == stock_text
    assert plugin.status().calls["split"] > 0
    patch.remove(model)


# ---------------------------------------------------------------------------------------------
# fusion policies


def fusion_policy(target, name="fuse siblings", groups=None, **fusion_fields):
    groups = (
        groups
        if groups is not None
        else [
            {"scope": "model.layers.*.self_attn", "members": ["q_proj", "k_proj", "v_proj"]},
            {"scope": "model.layers.*.mlp", "members": ["gate_proj", "up_proj"]},
        ]
    )
    return P.make_policy(target=target, name=name, fusion={"groups": groups, **fusion_fields})


def test_a_fusion_policy_is_applied_at_load_and_undone_by_disable(tiny_dir, tmp_path):
    import mlx_lm
    from mlx.utils import tree_flatten

    stock_model, tok = load_tiny(tiny_dir)
    stock_text = mlx_lm.generate(stock_model, tok, "hello world", max_tokens=6)
    stock_params = dict(tree_flatten(stock_model.parameters()))
    path = write_json(tmp_path / "p.json", fusion_policy(target_of(stock_model)))

    plugin.enable_optimizations(path)
    model, tok = load_tiny(tiny_dir)
    rec = plugin.status().models[-1]
    assert rec.source == "file" and rec.patched_layers == 0, rec  # fused, nothing to dispatch
    assert rec.fusion["instances"] == 4 and rec.fusion["matmuls_per_token"] == [15, 9], rec.fusion
    assert fusion.count_linear_calls(model) == 9
    assert mlx_lm.generate(model, tok, "hello world", max_tokens=6) == stock_text
    text = str(plugin.status())
    assert "fused: q/k/v fused in 2 modules, gate/up fused in 2 modules: 15 → 9 matmuls per token" in text, text
    # Steady-state parameter memory equals stock (the originals' arrays were released).
    nbytes = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    assert abs(nbytes - sum(v.nbytes for v in stock_params.values())) <= 0.01 * nbytes

    plugin.disable()
    after = dict(tree_flatten(model.parameters()))
    assert list(after) == list(stock_params)
    assert all(mx.array_equal(after[k], stock_params[k]).item() for k in after)
    assert fusion.count_linear_calls(model) == 15
    assert models.fingerprint(model) == target_of(stock_model)["model"]


def test_a_fused_model_saves_the_stock_layout(tiny_dir, tmp_path):
    import mlx_lm.utils as mlx_lm_utils
    from mlx.utils import tree_flatten

    stock_model, _ = load_tiny(tiny_dir)
    stock_params = dict(tree_flatten(stock_model.parameters()))
    plugin.enable_optimizations(write_json(tmp_path / "p.json", fusion_policy(target_of(stock_model))))
    model, _ = load_tiny(tiny_dir)
    assert fusion.fused_of(model) is not None

    # Module.save_weights: the stock names and values, loadable by a stock model (strict).
    model.save_weights(str(tmp_path / "w.safetensors"))
    saved = mx.load(str(tmp_path / "w.safetensors"))
    assert set(saved) == set(stock_params)
    assert all(mx.array_equal(saved[k], stock_params[k]).item() for k in saved)
    # ... and a fused model takes a stock checkpoint (unfused for the load, fused again after).
    model.load_weights(str(tmp_path / "w.safetensors"), strict=True)
    assert fusion.count_linear_calls(model) == 9
    plugin.disable()
    fresh, _ = load_tiny(tiny_dir)
    fresh.load_weights(str(tmp_path / "w.safetensors"), strict=True)
    plugin.enable_optimizations(tmp_path / "p.json")
    model, _ = load_tiny(tiny_dir)

    # mlx_lm's save_model (what mlx_lm.convert and mlx_lm.fuse call, through the module): the stock
    # layout too; the model stays fused.
    mlx_lm_utils.save_model(tmp_path / "saved", model)
    files = sorted((tmp_path / "saved").glob("*.safetensors"))
    written = {}
    for f in files:
        written.update(mx.load(str(f)))
    assert set(written) == set(stock_params)
    assert fusion.fused_of(model) is not None and fusion.count_linear_calls(model) == 9


def test_lora_conversion_and_mlx_lms_trainer_get_the_stock_layout(tiny_dir, tmp_path):
    from mlx_lm.tuner.utils import linear_to_lora_layers

    stock_model, _ = load_tiny(tiny_dir)
    plugin.enable_optimizations(write_json(tmp_path / "p.json", fusion_policy(target_of(stock_model))))
    model, _ = load_tiny(tiny_dir)
    assert fusion.fused_of(model) is not None
    import mlx_lm.tuner.utils as tuner_utils

    # The name imported before the plugin wrapped it is the original: call through the module, as
    # mlx_lm.lora does after importing it (the plugin rebinds every mlx_lm module's reference).
    assert tuner_utils.linear_to_lora_layers is not linear_to_lora_layers
    model.freeze()
    tuner_utils.linear_to_lora_layers(model, 2, {"rank": 4, "scale": 10.0, "dropout": 0.0})
    assert fusion.fused_of(model) is None
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == "LoRALinear"
    assert "fusion undone for LoRA layers (mlx_lm.tuner): stock layout" in str(plugin.status())


def test_fusion_groups_the_model_lacks_are_skipped_with_the_reason(tiny_dir, tmp_path):
    import mlx_lm

    stock_model, tok = load_tiny(tiny_dir)
    stock_text = mlx_lm.generate(stock_model, tok, "hello", max_tokens=4)
    groups = [
        {"scope": "model.layers.*.self_attn", "members": ["q_proj", "o_proj"]},  # not same input
        {"scope": "transformer.h.*.attn", "members": ["c_attn", "c_proj"]},
    ]
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        plugin.enable_optimizations(
            write_json(tmp_path / "p.json", fusion_policy(target_of(stock_model), groups=groups))
        )
        model, tok = load_tiny(tiny_dir)
    assert not tilewise_warnings(w)
    rec = plugin.status().models[-1]
    assert rec.fusion["instances"] == 0 and len(rec.fusion["skipped"]) == 3, rec.fusion
    text = str(plugin.status())
    assert "not fused: model.layers.0.self_attn q_proj/o_proj: its members did not read the same input" in text, text
    assert "not fused: transformer.h.*.attn c_attn/c_proj: no module of the model matches this scope" in text
    assert mlx_lm.generate(model, tok, "hello", max_tokens=4) == stock_text


def test_cli_generate_applies_a_fusion_policy(tiny_dir, tmp_path, fresh_plugin):
    stock_model, _ = load_tiny(tiny_dir)
    path = write_json(tmp_path / "p.json", fusion_policy(target_of(stock_model)))
    gen = ["generate", "--model", str(tiny_dir), "--prompt", "hello", "--max-tokens", "6"]
    stock = subprocess.run([sys.executable, "-m", "mlx_lm", *gen], capture_output=True, text=True, timeout=120)
    out = run_cli(["--policy", str(path), *gen], fresh_plugin)
    assert out.returncode == 0, out.stderr
    assert "q/k/v fused in 2 modules, gate/up fused in 2 modules: 15 → 9 matmuls per token" in out.stderr, out.stderr
    strip = lambda s: s.split("==========")[1]  # noqa: E731
    assert strip(out.stdout) == strip(stock.stdout)


def test_the_plugin_does_not_import_measurement_code():
    """What runs inside a user's mlx_lm process stays small: no worker, measurement or workload code."""
    code = "import json, sys, tilewise.plugin; print(json.dumps(sorted(m for m in sys.modules if m.startswith('tilewise.'))))"
    out = subprocess.run([sys.executable, "-c", code], cwd=EVALUATOR, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    loaded = set(json.loads(out.stdout.strip().splitlines()[-1]))
    measuring = {"tilewise.worker", "tilewise.measure", "tilewise.evaluate", "tilewise.gate", "tilewise.shapes"}
    assert not loaded & (measuring | {"tilewise.workloads"}), loaded
    assert {"tilewise.plugin", "tilewise.fusion", "tilewise.patch", "tilewise.policy", "tilewise.backend"} <= loaded
