"""A small JSON-RPC client for the tilewise daemon's local socket, standard library only.

The plugin runs inside the user's mlx_lm process, so this client must never add a dependency, never
hang the user's program and never raise anything but :class:`DaemonUnavailable` / :class:`DaemonError`.
Every call runs against one overall *deadline* (connect + every request + every reply), because a
slow daemon must cost the user at most that much once per process.

The wire format and the socket location are the contract in ``docs/protocol.md``: one JSON-RPC 2.0
message per ``\\n``-terminated UTF-8 line, at most 64 KiB per line; the socket is
``$TILEWISE_SOCKET``, else ``$TILEWISE_HOME/run/tilewised.sock``, else the platform's location.
"""

from __future__ import annotations

import functools
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any, Mapping, Optional

#: Protocol major version this client speaks (``hello.protocol``).
PROTOCOL = 1
#: Longest request line the daemon reads (docs/protocol.md, "Framing").
MAX_REQUEST_LINE = 64 * 1024
#: Longest reply line accepted from the daemon: replies such as ``session.show`` of a long session
#: run past the request limit.
MAX_REPLY_LINE = 16 * 1024 * 1024
#: Default budget for connect + handshake + one request: short, because it runs in the user's process.
DEFAULT_TIMEOUT_S = 0.2


@functools.lru_cache(maxsize=1)
def _client_name() -> str:
    try:
        from importlib.metadata import version

        return f"tilewise-py/{version('tilewise')}"
    except Exception:  # not installed as a distribution (e.g. PYTHONPATH checkout)
        return "tilewise-py/0"


class DaemonUnavailable(Exception):
    """The daemon could not be reached in time: no socket, refused, timed out, closed, or garbled."""


class DaemonError(Exception):
    """The daemon answered with a JSON-RPC error object."""

    def __init__(self, code: int, message: str, data: Any = None):
        super().__init__(f"daemon error {code}: {message}")
        self.code = code
        self.message = message
        self.data = data


def home_dir(env: Mapping[str, str] = os.environ) -> Path:
    """The tilewise home: ``$TILEWISE_HOME`` or the platform's data dir (as daemon/src/paths.rs)."""
    if env.get("TILEWISE_HOME"):
        return Path(env["TILEWISE_HOME"])
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Application Support" / "tilewise"
    xdg = env.get("XDG_DATA_HOME")
    base = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".local" / "share"
    return base / "tilewise"


def cache_dir(env: Mapping[str, str] = os.environ) -> Path:
    """Where the plugin caches the daemon's answers: ``$TILEWISE_HOME/cache``, else the platform's
    cache dir (``$XDG_CACHE_HOME/tilewise``, ``~/Library/Caches/tilewise``). Losing it costs nothing."""
    if env.get("TILEWISE_HOME"):
        return Path(env["TILEWISE_HOME"]) / "cache"
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches" / "tilewise"
    xdg = env.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".cache") / "tilewise"


def socket_path(env: Mapping[str, str] = os.environ) -> Path:
    """Where the daemon listens, by the table in docs/protocol.md ("Where the socket is")."""
    if env.get("TILEWISE_SOCKET"):
        return Path(env["TILEWISE_SOCKET"])
    if env.get("TILEWISE_HOME"):
        return Path(env["TILEWISE_HOME"]) / "run" / "tilewised.sock"
    if sys.platform != "darwin":
        runtime = env.get("XDG_RUNTIME_DIR")
        if runtime and os.path.isabs(runtime):
            return Path(runtime) / "tilewise" / "tilewised.sock"
    return home_dir(env) / "run" / "tilewised.sock"


class DaemonClient:
    """One connection to the daemon. Use as a context manager; every call shares one deadline.

    >>> with DaemonClient(timeout=0.2) as c:   # doctest: +SKIP
    ...     c.hello(); c.call("policy.get", {"model": fp, "mlx": "0.32.4", "backend": "cpu"})
    """

    def __init__(self, path: Optional[os.PathLike] = None, timeout: float = DEFAULT_TIMEOUT_S):
        self.path = Path(path) if path is not None else socket_path()
        self.deadline = time.monotonic() + timeout
        self._sock: Optional[socket.socket] = None
        self._buf = bytearray()
        self._next_id = 1

    # -- connection -----------------------------------------------------------------------------
    def __enter__(self) -> "DaemonClient":
        self.connect()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _remaining(self) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise DaemonUnavailable(f"daemon did not answer in time ({self.path})")
        return left

    def connect(self) -> None:
        if not hasattr(socket, "AF_UNIX"):
            raise DaemonUnavailable("this platform has no Unix domain sockets")
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            raise DaemonUnavailable(f"daemon not running (no socket at {self.path})") from None
        except OSError as e:
            raise DaemonUnavailable(f"cannot stat socket {self.path}: {e}") from None
        # The daemon checks our UID; we check it is our own daemon's socket before trusting answers.
        if hasattr(os, "getuid") and st.st_uid != os.getuid():
            raise DaemonUnavailable(f"socket {self.path} belongs to uid {st.st_uid}, not to this user")
        budget = self._remaining()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(budget)
            sock.connect(str(self.path))
        except (socket.timeout, TimeoutError):
            sock.close()
            raise DaemonUnavailable(f"connecting to {self.path} timed out") from None
        except OSError as e:
            sock.close()
            raise DaemonUnavailable(f"cannot connect to {self.path}: {e.strerror or e}") from None
        self._sock = sock

    def close(self) -> None:
        if self._sock is not None:
            try:
                self._sock.close()
            finally:
                self._sock = None

    # -- framing --------------------------------------------------------------------------------
    def _send(self, msg: dict) -> None:
        data = json.dumps(msg, separators=(",", ":"), ensure_ascii=False).encode() + b"\n"
        if len(data) > MAX_REQUEST_LINE:
            raise ValueError(f"request of {len(data)} bytes exceeds the {MAX_REQUEST_LINE}-byte frame limit")
        assert self._sock is not None, "connect() first"
        try:
            self._sock.settimeout(self._remaining())
            self._sock.sendall(data)
        except (socket.timeout, TimeoutError):
            raise DaemonUnavailable("sending to the daemon timed out") from None
        except OSError as e:
            raise DaemonUnavailable(f"sending to the daemon failed: {e}") from None

    def _read_line(self) -> bytes:
        assert self._sock is not None, "connect() first"
        searched = 0  # the buffer before this offset holds no newline: a big reply is scanned once
        while (end := self._buf.find(b"\n", searched)) < 0:
            if len(self._buf) > MAX_REPLY_LINE:
                raise DaemonUnavailable(f"daemon sent a line longer than {MAX_REPLY_LINE} bytes")
            searched = len(self._buf)
            try:
                self._sock.settimeout(self._remaining())
                chunk = self._sock.recv(65536)
            except (socket.timeout, TimeoutError):
                raise DaemonUnavailable("daemon did not answer in time") from None
            except OSError as e:
                raise DaemonUnavailable(f"reading from the daemon failed: {e}") from None
            if not chunk:
                raise DaemonUnavailable("daemon closed the connection")
            self._buf += chunk
        line = bytes(self._buf[:end])
        del self._buf[: end + 1]
        return line

    def call(self, method: str, params: Optional[dict] = None) -> Any:
        """Send one request and return its ``result``; notifications in between are skipped."""
        req_id = self._next_id
        self._next_id += 1
        msg: dict = {"jsonrpc": "2.0", "id": req_id, "method": method}
        if params is not None:
            msg["params"] = params
        self._send(msg)
        while True:
            line = self._read_line()
            try:
                reply = json.loads(line)
            except ValueError:
                raise DaemonUnavailable(f"daemon sent malformed JSON: {line[:80]!r}") from None
            if not isinstance(reply, dict):
                raise DaemonUnavailable(f"daemon sent a non-object message: {line[:80]!r}")
            if reply.get("id") != req_id:
                continue  # an event notification or a stale reply: not ours
            if "error" in reply:
                err = reply["error"] if isinstance(reply["error"], dict) else {}
                raise DaemonError(int(err.get("code", -32000)), str(err.get("message", "")), err.get("data"))
            if "result" not in reply:
                raise DaemonUnavailable(f"daemon reply has neither result nor error: {line[:80]!r}")
            return reply["result"]

    # -- methods --------------------------------------------------------------------------------
    def hello(self) -> dict:
        """The handshake; refuses a daemon whose protocol major version differs from ours."""
        result = self.call("hello", {"client": _client_name(), "protocol": PROTOCOL, "pid": os.getpid()})
        if not isinstance(result, dict) or result.get("protocol") != PROTOCOL:
            raise DaemonUnavailable(f"daemon speaks protocol {result!r}, this client speaks {PROTOCOL}")
        return result

    def policy_get(
        self,
        model: str,
        mlx: str,
        backend: str,
        device: Optional[str] = None,
        model_name: Optional[str] = None,
        dtype: Optional[str] = None,
    ) -> dict:
        """``model_name`` (how the model was loaded) and ``dtype`` (``bfloat16``, ``q4``...) are
        recorded by the daemon with the fetch, for ``tilewise models`` and ``tilewise status``."""
        params = {"model": model, "mlx": mlx, "backend": backend}
        if device is not None:
            params["device"] = device
        if model_name:
            params["model_name"] = model_name[:4096]
        if dtype:
            params["dtype"] = dtype[:32]
        result = self.call("policy.get", params)
        if not isinstance(result, dict) or not isinstance(result.get("policy"), dict):
            raise DaemonUnavailable(f"policy.get returned no policy object: {str(result)[:120]}")
        return result

    def status(self) -> dict:
        result = self.call("status")
        if not isinstance(result, dict):
            raise DaemonUnavailable(f"status returned {type(result).__name__}, not an object")
        return result


def find_daemon_binary(name: str = "tilewised") -> Optional[Path]:
    """``$TILEWISE_DAEMON_BIN``, else a build of this checkout (``target/release`` then
    ``target/debug``), else ``name`` on PATH; None when there is none."""
    import shutil

    if os.environ.get("TILEWISE_DAEMON_BIN"):
        return Path(os.environ["TILEWISE_DAEMON_BIN"])
    repo = Path(__file__).resolve().parents[2]
    for profile in ("release", "debug"):
        p = repo / "target" / profile / name
        if p.is_file() and os.access(p, os.X_OK):
            return p
    found = shutil.which(name)
    return Path(found) if found else None


class LocalDaemon:
    """A ``tilewised`` child process in its own ``TILEWISE_HOME`` (tests and benchmarks).

    ``with LocalDaemon(binary, home) as d:`` starts it, waits until it answers ``hello``, and on exit
    asks it to shut down (``daemon.shutdown``), killing it only if it does not stop in time.
    """

    def __init__(self, binary: os.PathLike, home: os.PathLike, args=(), start_timeout: float = 30.0, env=None):
        import subprocess

        self.home = Path(home)
        self.socket = self.home / "run" / "tilewised.sock"
        self.log = open(self.home / "tilewised.out", "ab")
        full_env = dict(os.environ if env is None else env, TILEWISE_HOME=str(self.home))
        full_env.pop("TILEWISE_SOCKET", None)
        self.proc = subprocess.Popen(
            [str(binary), *args], env=full_env, stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
        deadline = time.monotonic() + start_timeout
        while True:
            if self.proc.poll() is not None:
                self.log.close()
                raise RuntimeError(
                    f"tilewised exited with {self.proc.returncode} at start; log:\n"
                    + (self.home / "tilewised.out").read_text(errors="replace")[-4000:]
                )
            try:
                with DaemonClient(self.socket, timeout=1.0) as c:
                    self.hello = c.hello()
                    self.status = c.status()
                break
            except DaemonUnavailable as e:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"tilewised did not answer on {self.socket} within {start_timeout} s") from e
                time.sleep(0.05)
        self.device_fingerprint = self.status.get("device_fingerprint")

    def client(self, timeout: float = 5.0) -> DaemonClient:
        return DaemonClient(self.socket, timeout=timeout)

    def stop(self, timeout: float = 15.0) -> int:
        """Graceful shutdown over the socket; SIGKILL after `timeout`. Returns the exit code."""
        import subprocess

        if self.proc.poll() is None:
            try:
                with self.client(timeout=2.0) as c:
                    c.call("daemon.shutdown")
            except (DaemonUnavailable, DaemonError):
                self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return self.proc.returncode

    def __enter__(self) -> "LocalDaemon":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
