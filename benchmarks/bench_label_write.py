"""The label write's latency on a real oxenstored: the 7-round-trip transaction (START, READ,
MKDIR, SET_PERMS, WRITE, SET_PERMS, END, each waited for) on a worker thread, the pipelined
one (START, the check and the four changes in one round trip, END) on a worker thread, and
the same three round trips on the reactor over the gateway's watch-free direct connection
(`shyped.xenstore.direct`), which the enforcer uses now.

Both run in the same process on the same xenstored, interleaved, ``--rounds`` times; the table
gives the median per write (µs), its spread, and the ratio new ÷ old. Nothing is asserted.

Run: .venv/bin/python benchmarks/bench_label_write.py [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

from twisted.internet import defer

from shyped.core.actions import label_dir, label_perms
from shyped.sandbox.xenstored import SandboxXenstored, short_instance_dir
from shyped.xenstore import Change, GatewayConfig, NoEntry, Op, Perm, Transaction, XenstoreGateway

D = 7
VM = b"/vm/00000000-0000-4000-8000-000000000007"


def _old(tx: Transaction) -> bool:
    perms = tuple(Perm.parse(p) for p in label_perms(D))
    try:
        if tx.read(f"/local/domain/{D}/vm") != VM:
            return False
    except NoEntry:
        return False
    tx.mkdir(label_dir(D))
    tx.set_perms(label_dir(D), perms)
    tx.write(label_dir(D) + "/label", b"ACM:p:a")
    tx.set_perms(label_dir(D) + "/label", perms)
    return True


def _changes() -> list[Change]:
    perms = tuple(Perm.parse(p) for p in label_perms(D))
    return [
        (Op.MKDIR, label_dir(D), None),
        (Op.SET_PERMS, label_dir(D), perms),
        (Op.WRITE, label_dir(D) + "/label", b"ACM:p:a"),
        (Op.SET_PERMS, label_dir(D) + "/label", perms),
    ]


def _new(tx: Transaction) -> bool:
    return tx.apply_if(f"/local/domain/{D}/vm", VM, _changes())


async def run(iterations: int, rounds: int) -> None:
    xsd = SandboxXenstored(short_instance_dir("bench-label"))
    xsd.start()
    gw = XenstoreGateway(GatewayConfig(socket_path=str(xsd.socket_path)))
    try:
        await gw.connect()
        await gw.write(f"/local/domain/{D}/vm", VM)
        assert gw.direct
        old, worker, direct = "7 round trips, worker", "pipelined, worker", "pipelined, direct"
        samples: dict[str, list[float]] = {old: [], worker: [], direct: []}
        check = f"/local/domain/{D}/vm"
        for _ in range(rounds):
            for name in samples:
                t = time.perf_counter()
                for _ in range(iterations):
                    if name == direct:
                        assert await gw.apply_if(check, VM, _changes())
                    else:
                        assert await gw.transaction(_old if name == old else _new)
                samples[name].append((time.perf_counter() - t) / iterations * 1e6)
        for name, xs in samples.items():
            print(f"{name:22} {statistics.median(xs):8.1f} µs ({min(xs):.1f}-{max(xs):.1f})")
        base = statistics.median(samples[old])
        for name in (worker, direct):
            print(f"{name} ÷ 7 round trips: {statistics.median(samples[name]) / base:.2f}")
    finally:
        await gw.close()
        xsd.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--iterations", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="30 writes, one round")
    args = parser.parse_args()
    if args.quick:
        args.iterations, args.rounds = 30, 1
    from twisted.internet import reactor as _reactor

    reactor: Any = _reactor

    def go() -> None:
        d = defer.ensureDeferred(run(args.iterations, args.rounds))
        d.addErrback(lambda f: f.printTraceback())
        d.addBoth(lambda _: reactor.stop())

    reactor.callWhenRunning(go)
    reactor.run()


if __name__ == "__main__":
    main()
