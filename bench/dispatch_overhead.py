"""Host cost of the patch's per-call dispatch: one linear layer called stock vs patched with the native
policy, interleaved blocks, graph building only (no evaluation, so only the Python/host side is timed).

Why: decode is host-bound (results/h100/NOTES.md, entries 8-9), so every nanosecond the dispatch adds
to each linear call shows up end to end once a policy patches a layer. This measures that cost
directly, where the end-to-end decode loops on the lent GPUs cannot resolve it (their noise is
several %). `--evaluator DIR` points at another copy of the `tilewise` package, to compare versions:
run it for each, alternately, on a quiet machine.

    python bench/dispatch_overhead.py [--evaluator evaluator] [--blocks 40] [--calls 20000]
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--evaluator", type=Path, default=ROOT / "evaluator", help="directory holding the tilewise package")
    ap.add_argument("--blocks", type=int, default=40, help="stock/patched block pairs, order alternating")
    ap.add_argument("--calls", type=int, default=20000, help="layer calls per block")
    ap.add_argument("--dims", type=int, default=896, help="K = N of the layer (Qwen2.5-0.5B's hidden size)")
    args = ap.parse_args()
    sys.path.insert(0, str(args.evaluator.resolve()))
    import mlx.core as mx
    import mlx.nn as nn

    from tilewise import patch
    from tilewise import policy as P

    class One(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = nn.Linear(args.dims, args.dims, bias=False)

    model = One()
    mx.eval(model.parameters())
    x = mx.zeros((1, 1, args.dims))  # a decode step's input: M = 1
    native = P.make_policy(rules=[], default={"kind": "native"})
    prepared = patch.prepare(native)

    def block(patched):
        if patched:
            patch.apply(model, prepared)
        f = model.layer
        t0 = time.perf_counter()
        for _ in range(args.calls):
            f(x)
        dt = time.perf_counter() - t0
        if patched:
            patch.remove(model)
        return dt / args.calls * 1e9

    block(False), block(True)  # warm
    stock, patched = [], []
    for i in range(args.blocks):
        for p in (False, True) if i % 2 == 0 else (True, False):
            (patched if p else stock).append(block(p))
    diffs = sorted(b - a for a, b in zip(stock, patched))
    lo, hi = diffs[len(diffs) // 10], diffs[-1 - len(diffs) // 10]
    print(f"tilewise from {Path(patch.__file__).parent}")
    print(
        f"ns per call (median of {args.blocks} blocks of {args.calls}): stock {statistics.median(stock):.0f}, "
        f"patched native {statistics.median(patched):.0f}; dispatch adds {statistics.median(diffs):.0f} ns "
        f"(10-90 % of blocks {lo:.0f} to {hi:.0f})"
    )


if __name__ == "__main__":
    main()
