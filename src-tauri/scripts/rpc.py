#!/usr/bin/env python3
"""A minimal client of tilewised's socket for shell scripts (standard library only; docs/protocol.md).

  rpc.py SOCKET METHOD [PARAMS_JSON]            prints the result as JSON (exit 1 with the error)
  rpc.py SOCKET --wait-event KIND [--timeout S] [--match KEY=PREFIX]
        subscribes, prints the first event of KIND whose data[KEY] starts with PREFIX, exit 1 on timeout
"""
import argparse
import json
import socket
import sys
import time


def connect(path):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(path)
    except (FileNotFoundError, ConnectionRefusedError) as e:
        sys.exit(f"no tilewised answers at {path}: {e.strerror}")
    return s, s.makefile("rwb")


def send(f, msg_id, method, params=None):
    msg = {"jsonrpc": "2.0", "id": msg_id, "method": method}
    if params is not None:
        msg["params"] = params
    f.write((json.dumps(msg) + "\n").encode())
    f.flush()


def reply(f, msg_id):
    while True:
        line = f.readline()
        if not line:
            raise SystemExit("daemon closed the connection")
        msg = json.loads(line)
        if msg.get("id") == msg_id:
            return msg


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("socket")
    ap.add_argument("method", nargs="?")
    ap.add_argument("params", nargs="?")
    ap.add_argument("--wait-event")
    ap.add_argument("--match", default=None)
    ap.add_argument("--timeout", type=float, default=30)
    ap.add_argument("--ready-file", help="touched once subscribed (so a caller can start what it waits for)")
    a = ap.parse_args()
    s, f = connect(a.socket)
    send(f, 1, "hello", {"client": "tilewise-rpc.py/1", "protocol": 1})
    hello = reply(f, 1)
    if "error" in hello:
        sys.exit(f"hello: {hello['error']}")
    if a.wait_event:
        send(f, 2, "events.subscribe", {"kinds": [a.wait_event]})
        sub = reply(f, 2)
        if "error" in sub:
            sys.exit(f"events.subscribe: {sub['error']}")
        if a.ready_file:
            open(a.ready_file, "w").close()
        key, _, prefix = (a.match or "").partition("=")
        deadline = time.monotonic() + a.timeout
        while time.monotonic() < deadline:
            s.settimeout(max(deadline - time.monotonic(), 0.01))
            try:
                line = f.readline()
            except (TimeoutError, socket.timeout):
                break
            if not line:
                sys.exit("daemon closed the connection")
            msg = json.loads(line)
            ev = msg.get("params") or {}
            if msg.get("method") == "event" and ev.get("kind") == a.wait_event:
                if not key or str((ev.get("data") or {}).get(key, "")).startswith(prefix):
                    print(json.dumps(ev))
                    return
        sys.exit(f"no {a.wait_event} event{' with ' + a.match if a.match else ''} within {a.timeout} s")
    params = json.loads(a.params) if a.params else None
    send(f, 2, a.method, params)
    msg = reply(f, 2)
    if "error" in msg:
        sys.exit(f"{a.method}: {json.dumps(msg['error'])}")
    print(json.dumps(msg["result"], indent=1))


if __name__ == "__main__":
    main()
