"""Flatness of the assembler's per-event cost: 10 vs 5,000 domains, this tree vs a baseline.

Times the two event kinds that used to scan the whole host: a ``/vm/<uuid>`` node removed and
written again (the domains naming the UUID are looked up), and a guest's home removed and its
domain written again while every other domain serves a vchan (the vchans it was a client of are
visited). Each host size runs in a child process with ``PYTHONPATH`` set to the tree under test,
this tree and the baseline tree interleaved, ``--rounds`` times; the table gives the median cost
per event (µs), its spread (min-max), and the ratios 5,000 ÷ 10 domains (goal ≤ 1.1) and this
tree ÷ baseline at each size. Nothing is asserted: it is a measurement.

Baseline: a git worktree of the older code, e.g.
    git worktree add /tmp/perf-base integ3
    .venv/bin/python benchmarks/bench_assembler_scale.py --baseline /tmp/perf-base
CI-cheap: ``--quick`` (10 vs 500 domains, one round; a smoke run, times are not asserted).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _child(n: int, reps: int) -> dict[str, float]:
    sys.path.insert(0, str(HERE))
    from bench_events import domain_nodes

    from shyped.core.assembler import EventAssembler

    asm = EventAssembler()
    for d in range(1, n + 1):
        asm.feed_batch(domain_nodes(d))
        peer = d % n + 1  # a vchan readable by the next domain
        for key in ("ring-ref", "event-channel"):
            asm.feed(
                f"/local/domain/{d}/data/vc/{key}", b"7", [f"n{d}".encode(), f"r{peer}".encode()]
            )
    d = n // 2 or 1
    uuid = f"00000000-0000-4000-8000-{d:012x}"
    out: dict[str, float] = {}
    t0 = time.perf_counter()
    for _ in range(reps):
        asm.feed(f"/vm/{uuid}", None)
        asm.feed(f"/vm/{uuid}", b"")
    out["/vm/<uuid> removed + written (per event)"] = (time.perf_counter() - t0) / (2 * reps)
    again = domain_nodes(d)
    t0 = time.perf_counter()
    for _ in range(reps):
        asm.feed(f"/local/domain/{d}", None)
        asm.feed_batch(again)
    out["home removed + domain written again"] = (time.perf_counter() - t0) / reps
    return out


def _run(tree: Path, n: int, reps: int) -> dict[str, float]:
    env = dict(os.environ, PYTHONPATH=str(tree))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", str(n), "--reps", str(reps)]
    res = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True, cwd=tree)
    return dict(json.loads(res.stdout))


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--baseline", type=Path, help="tree of the baseline (a git worktree)")
    parser.add_argument("--sizes", default="10,5000", help="the two host sizes")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--reps", type=int, default=300, help="events per measurement")
    parser.add_argument("--quick", action="store_true", help="10 vs 500 domains, one round")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(_child(args.child, args.reps)))
        return
    if args.quick:
        args.sizes, args.rounds, args.reps = "10,500", 1, 50
    small, large = (int(x) for x in args.sizes.split(","))
    trees = {"this": HERE.parent}
    if args.baseline is not None:
        trees["base"] = args.baseline.resolve()
    samples: dict[tuple[str, int, str], list[float]] = {}
    for _ in range(args.rounds):
        for n in (small, large):
            for name, tree in trees.items():
                for what, sec in _run(tree, n, args.reps).items():
                    samples.setdefault((name, n, what), []).append(sec * 1e6)
    whats = sorted({k[2] for k in samples})
    for what in whats:
        print(what)
        for name in trees:
            a, b = samples[(name, small, what)], samples[(name, large, what)]
            ma, mb = statistics.median(a), statistics.median(b)
            print(
                f"  {name:5} {small:>5}: {ma:9.1f} µs ({min(a):.1f}-{max(a):.1f})"
                f"  {large:>5}: {mb:9.1f} µs ({min(b):.1f}-{max(b):.1f})"
                f"  {large}÷{small} = {mb / ma:6.2f}"
            )
        if "base" in trees:
            for n in (small, large):
                r = statistics.median(samples[("this", n, what)]) / statistics.median(
                    samples[("base", n, what)]
                )
                print(f"  this ÷ base at {n}: {r:.2f}")


if __name__ == "__main__":
    main()
