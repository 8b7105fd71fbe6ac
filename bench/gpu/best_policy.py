#!/usr/bin/env python3
"""Prints, as JSON, every best policy of the daemon of TILEWISE_HOME with its evidence (history + the
policy.get answer per model): what a tuning session on the lent machine proved, for the results folder."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "evaluator"))

from tilewise.daemon_client import DaemonClient  # noqa: E402

with DaemonClient(timeout=30) as c:
    c.hello()
    status = c.status()
    history = c.call("history", {})
    out = {"device_fingerprint": status.get("device_fingerprint"), "history": history, "best": []}
    for h in history.get("promotions", []):
        answer = c.policy_get(h["model"], h["mlx"], h["backend"])
        if answer.get("hash") == h["hash"]:
            out["best"].append(answer)
print(json.dumps(out, indent=1, default=str))
