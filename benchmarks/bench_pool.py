"""Pool mode: label propagation latency (a label set on host A -> in force on host B) against a
bare etcd put -> watch round trip measured in the same run, on the same 3-member cluster.

* **Baseline (bare etcd)**: an `EtcdClient` on member 1 puts a key; a watch opened through
  member 2 delivers it. The interval is put start -> the watch callback: the least any
  propagation through etcd can cost (Raft commit on a quorum, watch fan-out, JSON gateway).
* **Propagation (shyped)**: host A's control backend registers a label for a new UUID
  (`register_domain`: the label store written locally and the entry put to etcd); host B's
  pool store receives it through its watch, validates the whole label snapshot, hands it to
  its engine (``set_labels``: the next decision uses it) and writes its cache. The interval
  ends when B's pool store has applied it (its listener runs right after ``set_labels``).

Rounds alternate baseline and propagation; p50 / p99 of each and the ratios; the count of
propagations over 1 s (the issue's bound). Three etcd members and two sandbox hosts (two
oxenstoreds, two in-process daemons) run on this machine: the numbers include the load of
all of them on 2 shared cores.

Run: .venv/bin/python benchmarks/bench_pool.py [--iterations 200] [--json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from twisted.internet import defer, task

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the tests' etcd cluster and pool hosts

from etcd_helpers import EtcdCluster  # noqa: E402
from pool_helpers import PoolHost  # noqa: E402

from shyped.control import backend as b  # noqa: E402
from shyped.sandbox.xenstored import SandboxXenstored, short_instance_dir  # noqa: E402
from shyped.service.etcd import EtcdClient  # noqa: E402


def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


async def measure(reactor: Any, iterations: int, out: dict[str, Any]) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="bench-pool-"))
    cluster = EtcdCluster(tmp)
    xsds: list[SandboxXenstored] = []
    hosts: list[PoolHost] = []
    try:
        cluster.start()
        for name in ("bench-a", "bench-b"):
            xsd = SandboxXenstored(short_instance_dir())
            xsd.start()
            xsds.append(xsd)
            hosts.append(PoolHost(name, xsd, cluster))
        for h in hosts:
            await h.start()
        a, bh = hosts
        writer = EtcdClient(reactor, cluster.endpoints[:1])
        reader = EtcdClient(reactor, cluster.endpoints[1:2])
        arrived: dict[str, float] = {}
        rev = await writer.put("/bench/bare/start", "0")
        watch = reader.watch(
            "/bench/bare/",
            rev + 1,
            lambda evs: [arrived.setdefault(e.key, time.perf_counter()) for e in evs],
        )
        applied: dict[str, float] = {}
        prefix = f"{bh.pool.keys.labels}uuid/"

        def on_change(entries: dict[str, str], changed: set[str] | None) -> None:
            now = time.perf_counter()
            for key in changed or ():
                if key.startswith(prefix):
                    applied.setdefault(key[len(prefix) :], now)

        bh.pool.listeners.append(on_change)
        bare: list[float] = []
        prop: list[float] = []
        for i in range(iterations):
            key = f"/bench/bare/{i}"
            t0 = time.perf_counter()
            await writer.put(key, str(i))
            while key not in arrived:
                await task.deferLater(reactor, 0.0005, lambda: None)
            bare.append(arrived[key] - t0)

            u = str(uuid.uuid4())
            t0 = time.perf_counter()
            a.ctl.register_domain(b.RegisterDomainArgs(uuid=u, label="bank-b-web"))
            while u not in applied:
                await task.deferLater(reactor, 0.0005, lambda: None)
            prop.append(applied[u] - t0)
        watch.cancel()
        await writer.close()
        await reader.close()
        ms = 1000.0
        out.update(
            iterations=iterations,
            bare_p50_ms=pct(bare, 0.5) * ms,
            bare_p99_ms=pct(bare, 0.99) * ms,
            propagation_p50_ms=pct(prop, 0.5) * ms,
            propagation_p99_ms=pct(prop, 0.99) * ms,
            propagation_mean_ms=statistics.fmean(prop) * ms,
            ratio_p50=pct(prop, 0.5) / pct(bare, 0.5),
            ratio_p99=pct(prop, 0.99) / pct(bare, 0.99),
            over_1s=sum(1 for x in prop if x > 1.0),
        )
    finally:
        for h in hosts:
            await h.stop()
        for xsd in xsds:
            xsd.stop()
            shutil.rmtree(xsd.instance_dir, ignore_errors=True)
        cluster.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def _report(out: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(out, indent=2))
        return
    print(f"label propagation A -> B vs bare etcd put -> watch ({out['iterations']} rounds)")
    print(f"  bare etcd     p50 {out['bare_p50_ms']:8.2f} ms   p99 {out['bare_p99_ms']:8.2f} ms")
    print(
        f"  propagation   p50 {out['propagation_p50_ms']:8.2f} ms   "
        f"p99 {out['propagation_p99_ms']:8.2f} ms"
    )
    print(f"  ratio         p50 {out['ratio_p50']:8.2f} x    p99 {out['ratio_p99']:8.2f} x")
    print(f"  over 1 s: {out['over_1s']} of {out['iterations']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iterations", type=int, default=200)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    out: dict[str, Any] = {}
    try:
        task.react(lambda reactor: defer.ensureDeferred(measure(reactor, args.iterations, out)))
    except SystemExit as exc:  # task.react exits; the report comes after
        if exc.code not in (0, None):
            raise
    _report(out, args.json)


if __name__ == "__main__":
    main()
