"""Cost of turning one xenstore node into typed events, on a small and on a large host.

Builds two assemblers + host models: one with 10 guest domains, one with 2,000 (each with a
vif, a vbd and a console as libxl writes them), then times the node kinds a watch delivers at
flood rate: a guest writing an irrelevant key under ``data/``, a guest flapping its frontend
``state``, rewriting a ring ref, writing garbage, and a vchan key with permissions. The cost must
not grow with the number of domains: the last column is the ratio large / small (~1.0 expected).
A baseline — ``str.split`` of the path plus one dict lookup, the least any parser does — is
timed in the same run, interleaved with the others, and each cost is given as a multiple of it.

Run: .venv/bin/python benchmarks/bench_events.py [--help]
"""

from __future__ import annotations

import argparse
import gc
import time
from collections.abc import Callable

from shyped.core.assembler import EventAssembler
from shyped.core.host import HostModel
from shyped.core.hostfacts import NeedsDecision

Node = tuple[str, bytes | None, list[bytes] | None]


def domain_nodes(d: int) -> list[Node]:
    """What libxl, the backends and the guest write for one domain (cf. layout-connected)."""
    uuid = f"00000000-0000-4000-8000-{d:012x}"
    home, lx = f"/local/domain/{d}", f"/libxl/{d}"
    nodes: list[Node] = [
        (f"{home}/name", f"guest{d}".encode(), None),
        (f"{home}/vm", f"/vm/{uuid}".encode(), None),
        (f"/vm/{uuid}", b"", None),
        (f"{lx}/type", b"pv", None),
    ]
    for kind, devid, res_key, res in (
        ("vif", 0, "bridge", b"xenbr0"),
        ("vbd", 51712, "params", b"/img"),
    ):
        fe, be = f"{home}/device/{kind}/{devid}", f"/local/domain/0/backend/{kind}/{d}/{devid}"
        nodes += [
            (f"{lx}/device/{kind}/{devid}/frontend", fe.encode(), None),
            (f"{lx}/device/{kind}/{devid}/backend", be.encode(), None),
            (f"{lx}/device/{kind}/{devid}/{res_key}", res, None),
            (f"{be}/state", b"4", None),
            (f"{be}/online", b"1", None),
            (f"{fe}/state", b"4", None),
            (f"{fe}/ring-ref", b"522", None),
            (f"{fe}/event-channel", b"10", None),
        ]
    return nodes


def build(n: int) -> tuple[EventAssembler, HostModel]:
    asm, model = EventAssembler(), HostModel(dom0_label="dom0")
    for d in range(1, n + 1):
        queue = [
            o
            for o in model.apply_all(asm.feed_batch(domain_nodes(d)))
            if isinstance(o, NeedsDecision)
        ]
        while queue:
            queue.extend(model.record_decision(queue.pop(), True, label="guest"))
    return asm, model


def workloads(n: int) -> dict[str, list[Node]]:
    d = n // 2 or 1  # a domain in the middle
    fe = f"/local/domain/{d}/device/vbd/51712"
    return {
        "data/ flood (ignored key)": [
            (f"/local/domain/{d}/data/k{i % 50}", b"x" * 32, None) for i in range(2000)
        ],
        "frontend state flapping": [
            (f"{fe}/state", b"3" if i % 2 else b"4", None) for i in range(2000)
        ],
        "ring-ref rewrite": [
            (f"{fe}/ring-ref", str(500 + i % 2).encode(), None) for i in range(2000)
        ],
        "garbage int (counted)": [(f"{fe}/event-channel", b" 1_0", None) for _ in range(2000)],
        "vchan key + perms": [
            (
                f"/local/domain/{d}/data/vchan/0/{i % 8}/event-channel",
                b"7",
                [b"n" + str(d).encode(), b"r0"],
            )
            for i in range(2000)
        ],
    }


def timed(fn: Callable[[], None]) -> float:
    gc.collect()
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def feeder(asm: EventAssembler, model: HostModel, nodes: list[Node]) -> Callable[[], None]:
    def run() -> None:
        for path, value, perms in nodes:
            for e in asm.feed(path, value, perms):
                model.apply(e)

    return run


def baseline(nodes: list[Node]) -> Callable[[], None]:
    table = {str(i): i for i in range(100)}

    def run() -> None:
        for path, _value, _perms in nodes:
            table.get(path.split("/")[3])

    return run


def best_of(runs: dict[str, Callable[[], None]], repeat: int) -> dict[str, float]:
    """Best time of each run, interleaved so that all of them see the same machine load."""
    best = dict.fromkeys(runs, float("inf"))
    for _ in range(repeat):
        for name, fn in runs.items():
            best[name] = min(best[name], timed(fn))
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--small", type=int, default=10, help="domains on the small host")
    ap.add_argument("--large", type=int, default=2000, help="domains on the large host")
    ap.add_argument("--repeat", type=int, default=9)
    args = ap.parse_args()
    t0 = time.perf_counter()
    small, large = build(args.small), build(args.large)
    print(f"built {args.small} + {args.large} domains in {time.perf_counter() - t0:.2f} s")
    wl_small, wl_large = workloads(args.small), workloads(args.large)
    print(f"{'workload':30} {'small ns':>9} {'large ns':>9} {'x base':>7} {'large/small':>12}")
    for name in wl_small:
        n = len(wl_large[name])
        best = best_of(
            {
                "base": baseline(wl_large[name]),
                "small": feeder(*small, wl_small[name]),
                "large": feeder(*large, wl_large[name]),
            },
            args.repeat,
        )
        s, lg, base = (best[k] / n * 1e9 for k in ("small", "large", "base"))
        print(f"{name:30} {s:9.0f} {lg:9.0f} {lg / base:7.1f} {lg / s:12.2f}")


if __name__ == "__main__":
    main()
