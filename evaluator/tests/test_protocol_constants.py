"""The constants the Rust daemon and the Python side must agree on, read from the Rust sources (the
policy schema is shared as one file instead: tests/test_policy.py)."""

import re
from pathlib import Path

from tilewise import daemon_client, worker

DAEMON_SRC = Path(__file__).resolve().parents[2] / "daemon" / "src"


def rust_const(file, name):
    """The integer value of `pub const NAME: <int type> = <expr>;` in a daemon source file
    (`1 << 20`, `64 * 1024` and plain numbers are what these use)."""
    text = (DAEMON_SRC / file).read_text()
    m = re.search(rf"pub const {name}: \w+ = ([0-9 <*_]+);", text)
    assert m, f"{name} not found in daemon/src/{file}"
    expr = m.group(1).replace("_", "")
    assert re.fullmatch(r"[0-9 <*]+", expr), expr
    return eval(expr)  # digits, spaces, << and * only (checked above)


def test_socket_protocol_version_and_frame_limit_agree():
    assert daemon_client.PROTOCOL == rust_const("ipc/protocol.rs", "PROTOCOL_VERSION")
    assert daemon_client.MAX_REQUEST_LINE == rust_const("ipc/protocol.rs", "MAX_REQUEST_LINE")
    assert daemon_client.MAX_REPLY_LINE == rust_const("ipc/protocol.rs", "MAX_REPLY_LINE")


def test_worker_protocol_version_and_line_limit_agree():
    assert worker.PROTOCOL == rust_const("worker.rs", "PROTOCOL")
    assert worker.MAX_LINE_BYTES == rust_const("worker.rs", "MAX_LINE_BYTES")
