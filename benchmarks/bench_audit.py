"""Cost of the audit trail: records/s per fsync strategy, decisions/s with audit on vs off.

Writer: the same records appended with one fsync per record (the floor: what an enforcing
daemon would pay without group commit), then with group commit (B records per write+fsync, as
`AsyncAuditLog` batches the records of one reactor tick), then without any fsync (page cache
only: what the file system costs besides the flush). Each rate is given as a multiple of the
fsync-per-record rate measured in the same run. Then the daemon's path, `AsyncAuditLog` under
the Twisted reactor: one record per reactor tick without waiting (the writer thread commits what
accumulated during each fsync together), and awaiting each record's Deferred before the next
(a fully serialised caller: one fsync per record).

Decisions: a simple in-process loop taking STE channel decisions with the example hosting
policy (`PolicyEngine.channel`, cache warm), with audit off, with audit on and group commit
(one flush per "tick" of T decisions), and with audit on and a flush per decision. Rates are
given as a fraction of the audit-off rate. Workloads are interleaved over several rounds and the
median round is reported, so a burst of disk activity from elsewhere hits all of them alike.

Run: .venv/bin/python benchmarks/bench_audit.py [--help]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from twisted.internet import task
from twisted.internet.defer import Deferred, DeferredList, ensureDeferred
from twisted.python.failure import Failure

from shyped.core.audit import Party, Record
from shyped.policy import toml_format
from shyped.policy.decisions import Hook, PolicyEngine
from shyped.service.auditlog import AsyncAuditLog, AuditLog, AuditSettings

ROOT = Path(__file__).resolve().parent.parent
POLICY = ROOT / "conf" / "policies" / "hosting.toml"
LABELS = ["dom0", "netdom", "bank-a-web", "bank-a-batch", "bank-b-web", "shop"]


def fs_type(path: Path) -> str:
    """The file system type holding `path` (from /proc/mounts), for the report."""
    best, kind = "", "?"
    try:
        with open("/proc/mounts") as f:
            for line in f:
                _dev, mnt, typ, *_ = line.split()
                if str(path).startswith(mnt) and len(mnt) > len(best):
                    best, kind = mnt, typ
    except OSError:
        pass
    return kind


class Bench:
    def __init__(self, base: Path, records: int) -> None:
        self.base = base
        self.records = records
        self.engine = PolicyEngine(toml_format.load(POLICY))
        self.pairs = [(a, b) for a in LABELS for b in LABELS]
        self.n = 0

    def fresh_log(self, *, durable: bool = True) -> AuditLog:
        self.n += 1
        d = self.base / f"log{self.n}"
        return AuditLog(AuditSettings(directory=d, max_file_bytes=64 << 20), durable=durable)

    def writer(self, batch: int, durable: bool = True) -> float:
        """Records/s appending `self.records` decisions, one flush per `batch`."""
        deny = self.engine.channel(Hook.EVTCHN, "bank-a-web", "bank-b-web")
        subj, obj = Party("bank-a-web-1", 3, label="bank-a-web"), Party("bank-b-web-1", 4)
        with self.fresh_log(durable=durable) as log:
            t0 = time.perf_counter()
            for i in range(self.records):
                log.record_decision(deny, subject=subj, obj=obj, mode="enforcing", port=i)
                if (i + 1) % batch == 0:
                    log.flush()
            log.flush()
            return self.records / (time.perf_counter() - t0)

    async def async_writer(self, reactor: Any, *, wait_each: bool) -> float:
        """Records/s through `AsyncAuditLog`: one append per reactor tick."""
        deny = self.engine.channel(Hook.EVTCHN, "bank-a-web", "bank-b-web")
        subj, obj = Party("bank-a-web-1", 3, label="bank-a-web"), Party("bank-b-web-1", 4)
        alog = AsyncAuditLog(self.fresh_log(), reactor)
        alog.start()
        try:
            t0 = time.perf_counter()
            pending: list[Deferred[Record]] = []
            for i in range(self.records):
                d = alog.record_decision(deny, subject=subj, obj=obj, port=i)
                if wait_each:
                    await d
                else:
                    pending.append(d)
                    await task.deferLater(reactor, 0, lambda: None)
            await DeferredList(pending, fireOnOneErrback=True)
            return self.records / (time.perf_counter() - t0)
        finally:
            await alog.stop()

    def decisions(self, tick: int | None) -> float:
        """Decisions/s of the loop; `tick` None: audit off, else one flush per `tick`."""
        engine, pairs, n = self.engine, self.pairs, self.records
        if tick is None:
            t0 = time.perf_counter()
            for i in range(n):
                a, b = pairs[i % len(pairs)]
                engine.channel(Hook.EVTCHN, a, b)
            return n / (time.perf_counter() - t0)
        with self.fresh_log() as log:
            t0 = time.perf_counter()
            for i in range(n):
                a, b = pairs[i % len(pairs)]
                d = engine.channel(Hook.EVTCHN, a, b)
                log.record_decision(
                    d, subject=Party(a, 1), obj=Party(b, 2), policy_sha256="ab" * 32
                )
                if (i + 1) % tick == 0:
                    log.flush()
            log.flush()
            return n / (time.perf_counter() - t0)


def run_async(
    bench: Bench, modes: dict[str, bool], rounds: int, results: dict[str, list[float]]
) -> None:
    """The `AsyncAuditLog` workloads, in one reactor run (a reactor cannot be restarted)."""
    from twisted.internet import reactor as default_reactor

    reactor: Any = default_reactor

    async def body() -> None:
        for _ in range(rounds):
            for name, wait_each in modes.items():
                results[name].append(await bench.async_writer(reactor, wait_each=wait_each))

    def report(failure: Failure) -> None:
        print(failure.getTraceback(), file=sys.stderr)

    def start() -> None:
        d = ensureDeferred(body())
        d.addErrback(report)
        d.addBoth(lambda _: reactor.stop())

    reactor.callWhenRunning(start)
    reactor.run()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--dir",
        type=Path,
        default=Path("/var/tmp"),
        help="where to create the scratch logs (default /var/tmp: a disk, not tmpfs)",
    )
    ap.add_argument("--records", type=int, default=1000, help="records per workload")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (median shown)")
    ap.add_argument("--batch", type=int, nargs="+", default=[10, 100], help="group commit sizes")
    ap.add_argument("--tick", type=int, default=100, help="decisions per flush (audit on)")
    args = ap.parse_args()

    base = Path(tempfile.mkdtemp(prefix="bench-audit-", dir=args.dir))
    bench = Bench(base, args.records)
    writers: dict[str, Callable[[], float]] = {"fsync per record": lambda: bench.writer(1)}
    for b in args.batch:
        writers[f"group commit, {b} per fsync"] = lambda b=b: bench.writer(b)  # type: ignore[misc]
    writers["no fsync (page cache only)"] = lambda: bench.writer(1, durable=False)
    loops: dict[str, Callable[[], float]] = {
        "audit off": lambda: bench.decisions(None),
        f"audit on, flush per {args.tick} decisions": lambda: bench.decisions(args.tick),
        "audit on, flush per decision": lambda: bench.decisions(1),
    }
    asyncs = {
        "async, 1 per reactor tick": False,
        "async, awaiting each record": True,
    }
    results: dict[str, list[float]] = {k: [] for k in [*writers, *asyncs, *loops]}
    try:
        for _ in range(args.rounds):
            for name, fn in [*writers.items(), *loops.items()]:
                results[name].append(fn())
        run_async(bench, asyncs, args.rounds, results)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in results.items()}

    print(
        f"scratch logs in {args.dir} ({fs_type(args.dir.resolve())}), {args.records} records "
        f"per workload, median of {args.rounds} rounds, {os.cpu_count()} CPUs"
    )
    base_rate = med["fsync per record"]
    print(f"\n{'writer':36} {'records/s':>12} {'x fsync-per-record':>19}")
    for name in [*writers, *asyncs]:
        print(f"{name:36} {med[name]:12.0f} {med[name] / base_rate:19.1f}")
    off = med["audit off"]
    print(f"\n{'decision loop':36} {'decisions/s':>12} {'x audit off':>19}")
    for name in loops:
        print(f"{name:36} {med[name]:12.0f} {med[name] / off:19.3f}")


if __name__ == "__main__":
    main()
