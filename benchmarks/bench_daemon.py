"""The daemon end to end on a sandbox oxenstored: decision latency, and boot storms.

Every figure is compared with a baseline measured in the same run on the same xenstored
(machines differ; ratios travel). Everything is measured once per host size N (``--present``
and ``--storm``, one sandbox per N): the toolstack creates N labelled domains (each a vif, a
vbd and a console, plus one ``web-a1``), then the daemon starts (the cold storm), then the
latencies are measured with those N domains present, then N more domains are created while
the daemon runs (the live storm).

* **Floor (echo)**: a raw-socket client writes a node; another raw client watching it gets the
  event and writes a reply node; the first client sees the reply's watch event. Write → event
  → write → event: the least any "write triggers a decision that is written back" can cost.
  Also shown: event + read (a watcher gets the event and reads the node), the least any
  decision needs before it can decide.
* **Admission (decision visible in xenstore)**: another process commits libxl's first
  domain-creation transaction (``libxl__domain_make``) for a labelled domain; the interval
  ends when a raw client of that process, watching ``/local/domain/<d>/shyped/label``, sees
  the label node the daemon writes on admission (the daemon's decision, visible in xenstore).
  Undone (``/vm``, ``/local/domain``, ``/libxl`` removed) after each sample.
* **vif / vchan decision (listener)**: another process commits the transaction libxl writes to
  add a vif (``libxl__device_add_async``: libxl record, backend and frontend directories) or
  the one a libxenvchan server writes (``ring-ref`` and ``event-channel`` with the client's
  read permission); the interval ends when the daemon's decision listener runs (watch events
  → one ``read_many`` → events → host model → engine). A permitted device or channel writes
  nothing to xenstore, so the listener is where its decision becomes observable; a denied one
  would be followed by the veto. Also shown: the daemon's own share (first watch event →
  decision).

  Rounds alternate floors and daemon; samples are pooled; p50 / p99 and x = p50 / echo p50.
* **Boot storm, cold**: the N domains exist before the daemon starts; the time from
  ``start()`` to everything decided and every label node written (one snapshot, N admissions,
  3N device decisions, N label transactions). Per domain against the first N.
* **Boot storm, live**: the daemon runs while the toolstack creates N more domains back to
  back; the time from the first ``create`` until the daemon had decided everything (the
  toolstack's own time dominates: shown per domain, with the daemon's lag after the last
  ``create``). Per domain against the first N.

* **Cold start ÷ bare walk**: the cold storm against the fastest of three bare snapshots of
  ``/`` (a fresh gateway; values and children, as reconcile reads them) taken just before the
  daemon starts, on the same tree.
* **RSS per domain**: this process's resident set after the cold start (``gc.collect()``)
  minus before it, per domain: the daemon's retained memory, allocator slack included; it
  runs in the benchmark's process (not a child), so it is an estimate, not a peak.

Baseline: ``--baseline-ref REF`` (a git ref of this repository, checked out with ``git
worktree add --detach`` into a temporary directory, removed after) or ``--baseline DIR`` (any
tree holding ``shyped/``): then this script runs itself ``--runs`` times (default 3) per tree
in child processes (``PYTHONPATH`` set to the tree), interleaved (this, base, base, this, ...),
and prints the latency rows of both, each run's x floor against its own floor, with the spread.

Run: .venv/bin/python benchmarks/bench_daemon.py [--iterations 200] [--present 10,1000]
[--storm 10,1000] [--json] [--baseline-ref main --storm '' --present 10]; ``--quick`` is the
CI-cheap smoke run (10 domains present, storms
of 10 and 50; about half a minute; it asserts only that every domain is admitted, never a
time). The default run takes 2.5 to 6 minutes on a loaded 2-core
machine, most of it the sandbox toolstack creating some 2,000 domains (it keeps its hypervisor
state in memory here: `MemoryHypervisor`).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import attrs
from twisted.internet import defer, threads

from shyped.core.engine import Outcome
from shyped.core.labelstore import LabelStore
from shyped.core.xlcfg import domain_config_from_text
from shyped.sandbox import devices as D
from shyped.sandbox import layout as L
from shyped.sandbox.hypervisor import HostState, HypervisorStore
from shyped.sandbox.toolstack import Toolstack
from shyped.sandbox.toolstack_base import apply_ops
from shyped.sandbox.xenstored import SandboxXenstored, short_instance_dir
from shyped.sandbox.xsconn import XsConn
from shyped.service.config import ActuatorConfig, Config, XenstoreConfig
from shyped.service.daemon import Daemon, load_policy
from shyped.xenstore import GatewayConfig, XenstoreGateway
from shyped.xenstore.errors import NoEntry
from shyped.xenstore.rawclient import RawClient

ROOT = Path(__file__).resolve().parents[1]
POLICY = ROOT / "conf" / "policies" / "hosting.toml"


class NoActuator:
    """Nothing is vetoed in these runs; an actuator call would be a bug."""

    def pause(self, domid: int) -> defer.Deferred[None]:
        raise AssertionError(f"unexpected pause {domid}")

    unpause = destroy = pause


@attrs.frozen
class MemoryHypervisor(HypervisorStore):
    """The sandbox hypervisor's state kept in this process instead of its JSON file, which is
    re-read and rewritten whole on every toolstack command (quadratic in domains: thousands of
    creates would take many minutes of toolstack time that says nothing about the daemon)."""

    state: HostState = attrs.field(factory=HostState)

    @contextlib.contextmanager
    def locked(self) -> Iterator[HostState]:
        yield self.state


def toolstack(xsd: SandboxXenstored) -> Toolstack:
    return Toolstack(xsd.socket_path, store=MemoryHypervisor(xsd.socket_path.parent / "hv"))


def labels(n: int) -> LabelStore:
    store = LabelStore().with_domain(name="web-a1", label="bank-a-web")
    store = store.with_domain(name=PROBE_NAME, label="shop")
    store = store.with_resource("bridge:xenbr-public", "xenbr-public")
    store = store.with_resource("bridge:xenbr-bank-a", "xenbr-bank-a")
    for i in range(n):
        store = store.with_domain(name=f"shop-{i}", label="shop")
        store = store.with_resource(f"/srv/images/shop-{i}.img", "shop-disk")
    return store


def config(xsd: SandboxXenstored) -> Config:
    return Config(
        policy=POLICY,
        xenstore=XenstoreConfig(socket=xsd.socket_path),
        actuator=ActuatorConfig(kind="sandbox"),
    )


#: ``--ab-direct``: every other decision with the gateway's second (watch-free, reactor-side)
#: connection off (`XenstoreGateway.prefer_direct`), both reported: what it is worth, same run.
AB_DIRECT = {"on": False}


def make_daemon(xsd: SandboxXenstored, store: LabelStore) -> Daemon:
    cfg = config(xsd)
    gateway = XenstoreGateway(GatewayConfig(socket_path=str(xsd.socket_path)))
    return Daemon(cfg, load_policy(cfg.policy), store, gateway=gateway, actuator=NoActuator())


def shop(i: int) -> Any:
    return domain_config_from_text(
        f'name = "shop-{i}"\nuuid = "00000000-0000-4000-9000-{i:012x}"\nmemory = 128\n'
        f"vif = ['bridge=xenbr-public']\n"
        f"disk = ['format=raw,vdev=xvda,access=rw,target=/srv/images/shop-{i}.img']\n"
    )


def stats(samples: Sequence[float]) -> dict[str, float]:
    s = sorted(samples)
    return {
        "n": len(s),
        "median_us": statistics.median(s) * 1e6,
        "p90_us": s[int(0.9 * (len(s) - 1))] * 1e6,
        "p99_us": s[int(0.99 * (len(s) - 1))] * 1e6,
    }


# ----------------------------------------------------------------------------- the baseline


def raw_event_read(socket_path: str, iterations: int) -> list[float]:
    """Write a node; a watching raw client gets the event and reads the node."""
    out: list[float] = []
    with RawClient(socket_path) as watcher, RawClient(socket_path) as writer:
        watcher.watch(b"/bench", b"b")
        watcher.wait_event()  # the registration's own event
        for i in range(iterations):
            path = b"/bench/k%d" % (i % 8)
            t0 = time.perf_counter()
            writer.write(path, b"%d" % i)
            got, _ = watcher.wait_event()
            watcher.read(got)
            out.append(time.perf_counter() - t0)
    return out


def raw_echo(socket_path: str, iterations: int) -> list[float]:
    """Write a request; a watching raw client gets the event and writes a reply; the writer
    sees the reply's watch event."""
    out: list[float] = []
    with RawClient(socket_path) as echo, RawClient(socket_path) as writer:
        echo.watch(b"/echo/req", b"q")
        echo.wait_event()
        writer.watch(b"/echo/reply", b"r")
        writer.wait_event()
        for i in range(iterations):
            t0 = time.perf_counter()
            writer.write(b"/echo/req", b"%d" % i)
            echo.wait_event()
            echo.write(b"/echo/reply", b"%d" % i)
            writer.wait_event()
            out.append(time.perf_counter() - t0)
    return out


# ----------------------------------------------------------------------------- decisions


def apply_tx(conn: XsConn, ops: Sequence[Any], before_commit: Any = None) -> None:
    conn.start()
    apply_ops(conn, ops)
    if before_commit is not None:
        before_commit()
    assert conn.commit()


#: The domain whose admission is measured: labelled (by name), outside the toolstack's domids.
PROBE_DOMID = 32000
PROBE_UUID = "00000000-0000-4000-8000-00000000fffe"
PROBE_NAME = "probe"
PROBE_LABEL_NODE = f"/local/domain/{PROBE_DOMID}/shyped/label"


def transactions(domid: int) -> dict[str, tuple[str, list[Any], list[Any]]]:
    """kind -> (what the daemon decides, the transaction's ops, the ops undoing it)."""
    dev = D.VifDevice(domid=domid, devid=7, mac="00:16:3e:00:00:07", bridge="xenbr-bank-a")
    add = [op for op in D.vif_add_step(dev).ops if not isinstance(op, L.Read)]
    vpath = f"/local/domain/0/data/vchan/{domid}/9"
    vchan = list(L.vchan_server_step(0, domid, vpath, 8, 23).ops)
    vif_dirs = [dev.frontend, dev.backend, L.libxl_device_path(domid, "vif", 7)]
    return {
        "vif": (f"device vif {domid}/7", add, [L.Rm(p) for p in vif_dirs]),
        "vchan": (f"vchan {vpath}", vchan, [L.Rm(vpath)]),
        "admit": (
            f"domain {PROBE_DOMID}",
            list(L.domain_make_step(PROBE_DOMID, PROBE_NAME, PROBE_UUID).ops),
            [
                L.Rm(path)
                for path in (
                    L.vm_path(PROBE_UUID),
                    L.dom_path(PROBE_DOMID),
                    L.libxl_path(PROBE_DOMID),
                )
            ],
        ),
    }


def writer(socket_path: str, domid: int) -> None:
    """Child process: on ``<kind>`` commit that transaction and print the time of the commit
    request (and, for ``admit``, the time its raw watcher saw the label node); on ``undo
    <kind>`` undo it. A process of its own, as libxl is: no GIL shared with the daemon."""
    txs = transactions(domid)
    t0 = 0.0

    def mark() -> None:
        nonlocal t0
        t0 = time.monotonic()  # CLOCK_MONOTONIC: comparable across processes

    with XsConn(socket_path) as conn:
        print("ready", flush=True)
        for line in sys.stdin:
            words = line.split()
            if not words:
                break
            if words[0] == "undo":
                apply_tx(conn, txs[words[1]][2])
                print("ok", flush=True)
            elif words[0] == "admit":
                with RawClient(socket_path) as watcher:
                    node = PROBE_LABEL_NODE.encode()
                    watcher.watch(node, b"label")
                    watcher.wait_event()  # the registration's own event
                    apply_tx(conn, txs["admit"][1], mark)
                    while True:
                        watcher.wait_event()
                        try:
                            watcher.read(node)
                        except NoEntry:
                            continue
                        break
                    seen = time.monotonic()
                print(repr(t0), repr(seen), flush=True)
            else:
                apply_tx(conn, txs[words[0]][1], mark)
                print(repr(t0), flush=True)


#: Suffix of the ``--ab-direct`` samples taken without the direct connection.
PLAIN = "_plain"


class Latency:
    """Drive the writer process; time from its commit request to the decision: the daemon's
    listener for vif and vchan, the label node seen by a raw watcher for an admission."""

    KINDS = ("vif", "vchan", "admit")

    def __init__(self, daemon: Daemon, socket_path: str, domid: int) -> None:
        self.daemon = daemon
        self.domid = domid
        self.txs = transactions(domid)
        self.decided: dict[str, float] = {}
        self.received: dict[str, float] = {}
        self.events: dict[str, threading.Event] = {}
        self.samples: dict[str, list[float]] = {k + v: [] for k in self.KINDS for v in ("", PLAIN)}
        #: the daemon's share: from the first watch event of the batch to the decision
        self.inside: dict[str, list[float]] = {k + v: [] for k in self.KINDS for v in ("", PLAIN)}
        #: admissions: commit request -> the daemon's listener (the label is written after)
        self.listener: list[float] = []
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "_writer", socket_path, str(domid)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None and self.proc.stdout.readline() == "ready\n"
        daemon.add_listener(self.seen)

    def seen(self, outcome: Outcome) -> None:
        event = self.events.get(outcome.what)
        if event is not None and outcome.what not in self.decided:
            self.decided[outcome.what] = time.monotonic()
            self.received[outcome.what] = outcome.received or 0.0
            event.set()

    def ask(self, line: str) -> str:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        return self.proc.stdout.readline()

    def round(self, reactor: Any, iterations: int) -> None:
        """Worker thread: alternate vif adds, vchan publications and admissions, each undone
        after (and the daemon settled) so that every sample starts from the same host; with
        ``--ab-direct`` every other iteration without the direct connection."""
        for i in range(iterations):
            plain = AB_DIRECT["on"] and i % 2 == 1
            threads.blockingCallFromThread(reactor, self._prefer_direct, not plain)
            for kind, (what, _ops, _undo) in self.txs.items():
                self.decided.pop(what, None)
                self.events[what] = done = threading.Event()
                times = [float(x) for x in self.ask(kind).split()]
                if not done.wait(10):
                    raise RuntimeError(f"no decision on {what}")
                t0 = times[0]
                key = kind + PLAIN if plain else kind
                if kind == "admit":
                    self.samples[key].append(times[1] - t0)
                    self.listener.append(self.decided[what] - t0)
                else:
                    self.samples[key].append(self.decided[what] - t0)
                self.inside[key].append(self.decided[what] - self.received[what])
                del self.events[what]
                self.ask(f"undo {kind}")
                threads.blockingCallFromThread(reactor, self.daemon.settled)

    def _prefer_direct(self, on: bool) -> defer.Deferred[None]:
        self.daemon.gateway.prefer_direct = on
        return defer.succeed(None)

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.proc.wait(10)


class GcPauses:
    """A `gc.callbacks` entry: how many collections of each generation ran and how long the
    longest took (the latency phase's tail may be one)."""

    def __init__(self) -> None:
        self.started = 0.0
        self.times: dict[int, list[float]] = {0: [], 1: [], 2: []}

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self.started = time.perf_counter()
        else:
            self.times[info["generation"]].append(time.perf_counter() - self.started)

    def summary(self) -> dict[str, str]:
        return {
            f"gen{g}": f"{len(t)}x max {max(t, default=0) * 1e3:.2f} ms"
            for g, t in self.times.items()
        }


async def measure_latency(
    reactor: Any, daemon: Daemon, socket_path: str, domid: int, iterations: int, rounds: int
) -> dict[str, Any]:
    """Floors and decisions, alternating in ``rounds``; p50/p99 against the echo floor."""
    lat = Latency(daemon, socket_path, domid)
    pauses = GcPauses()
    gc.callbacks.append(pauses)
    reader = getattr(daemon, "_reader", None)
    rounds_before = dict(getattr(reader, "rounds", {}))
    timeouts_before = getattr(reader, "barrier_timeouts", 0)
    echo: list[float] = []
    event_read: list[float] = []
    per = max(1, iterations // rounds)
    try:
        for _ in range(rounds):
            echo += await threads.deferToThread(raw_echo, socket_path, per)
            event_read += await threads.deferToThread(raw_event_read, socket_path, per)
            await threads.deferToThread(lat.round, reactor, per)
    finally:
        lat.close()
        gc.callbacks.remove(pauses)
    floor = stats(echo)
    out: dict[str, Any] = {"floor_echo": floor, "floor_event_read": stats(event_read)}
    out["gc_pauses"] = pauses.summary()
    out["barrier_timeouts"] = getattr(reader, "barrier_timeouts", 0) - timeouts_before
    rounds_after = dict(getattr(reader, "rounds", {}))
    out["batch_rounds"] = {
        str(k): v - rounds_before.get(k, 0) for k, v in sorted(rounds_after.items())
    }
    out["floor_event_read"]["x_floor"] = out["floor_event_read"]["median_us"] / floor["median_us"]
    for key, samples in lat.samples.items():
        if not samples:
            continue
        s = stats(samples)
        s["x_floor"] = s["median_us"] / floor["median_us"]
        s["inside_median_us"] = statistics.median(lat.inside[key]) * 1e6
        if key == "admit":
            s["listener_median_us"] = statistics.median(lat.listener) * 1e6
        out[key] = s
    return out


# ----------------------------------------------------------------------------- one host size


async def bench_size(
    reactor: Any, n: int, *, latency: bool, storm: bool, iterations: int, rounds: int
) -> dict[str, Any]:
    """N domains, then the cold start, the latencies with N present, the live storm."""
    directory = short_instance_dir("bench-daemon")
    xsd = SandboxXenstored(directory)
    xsd.start()
    out: dict[str, Any] = {"domains": n}
    try:
        socket_path = str(xsd.socket_path)
        ts = toolstack(xsd)
        ts.boot_host()
        web = ts.create(
            domain_config_from_text(
                'name = "web-a1"\nuuid = "00000000-0000-4000-8000-0000000000a1"\n'
            )
        )
        t = time.perf_counter()
        await threads.deferToThread(lambda: [ts.create(shop(i)) for i in range(n)])
        create_s = time.perf_counter() - t
        walk = await bare_walk(socket_path)
        gc.collect()
        rss_before = rss_bytes()
        daemon = make_daemon(xsd, labels(2 * n))
        decided: list[Outcome] = []
        daemon.add_listener(decided.append)
        t = time.perf_counter()
        await daemon.start()
        await daemon.settled()
        cold = time.perf_counter() - t
        gc.collect()
        out["rss_kib_per_domain"] = (rss_bytes() - rss_before) / 1024 / (n + 1)
        admitted = sum(1 for o in decided if o.kind == "domain" and o.allowed)
        assert admitted == n + 1, f"cold storm: {admitted} of {n + 1} admitted"
        if storm:
            out["cold_s"] = cold
            out["walk_s"] = walk
            out["toolstack_create_ms_per_domain"] = create_s / n * 1e3
        if latency:
            out["latency"] = await measure_latency(
                reactor, daemon, socket_path, web, iterations, rounds
            )
        if storm:
            before = len(decided)
            t = time.perf_counter()
            await threads.deferToThread(lambda: [ts.create(shop(n + i)) for i in range(n)])
            created = time.perf_counter()
            await daemon.settled()
            done = time.perf_counter()
            new = sum(1 for o in decided[before:] if o.kind == "domain" and o.allowed)
            assert new == n, f"live storm: {new} of {n} admitted"
            out["live_s"] = done - t
            out["live_create_ms_per_domain"] = (created - t) / n * 1e3
            out["live_lag_ms"] = (done - created) * 1e3
        await daemon.stop()
    finally:
        xsd.stop()
        shutil.rmtree(directory, ignore_errors=True)
    return out


async def bare_walk(socket_path: str, repeat: int = 3) -> float:
    """The fastest of `repeat` snapshots of ``/`` without permissions (what the cold start's
    reconcile reads) by a fresh gateway: the cold start's floor on the same tree."""
    gw = XenstoreGateway(GatewayConfig(socket_path=socket_path))
    await gw.connect()
    try:
        best = float("inf")
        for _ in range(repeat):
            t = time.perf_counter()
            await gw.snapshot("/", with_perms=False)
            best = min(best, time.perf_counter() - t)
        return best
    finally:
        await gw.close()


def rss_bytes() -> int:
    """This process's resident set (``/proc/self/statm``)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# ----------------------------------------------------------------------------- main


def sizes(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--iterations", type=int, default=200, help="decisions per kind and N")
    parser.add_argument("--rounds", type=int, default=4, help="floor/daemon alternations")
    parser.add_argument(
        "--present", default="10,1000", help="domains present while measuring latency"
    )
    parser.add_argument("--storm", default="10,1000", help="domain counts for the storms")
    parser.add_argument("--json", action="store_true", help="print JSON only")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="CI smoke run: 20 decisions, 1 round, 10 domains present, storms of 10 and 50",
    )
    parser.add_argument(
        "--ab-direct",
        action="store_true",
        help="alternate decisions with and without the gateway's second connection; "
        "report both (rows '… (watch conn.)')",
    )
    parser.add_argument("--baseline", type=Path, help="a tree holding shyped/ (the baseline)")
    parser.add_argument("--baseline-ref", help="a git ref: its worktree is the baseline")
    parser.add_argument("--runs", type=int, default=3, help="child runs per tree (baseline)")
    args = parser.parse_args(argv)
    AB_DIRECT["on"] = args.ab_direct
    if args.quick:
        args.iterations, args.rounds, args.present, args.storm = 20, 1, "10", "10,50"
    if args.baseline_ref or args.baseline is not None:
        return compare(args)
    present, storm = sizes(args.present), sizes(args.storm)
    result: dict[str, Any] = {"sizes": []}
    from twisted.internet import reactor as _reactor

    reactor: Any = _reactor

    async def run() -> None:
        for n in sorted(set(present) | set(storm)):
            result["sizes"].append(
                await bench_size(
                    reactor,
                    n,
                    latency=n in present,
                    storm=n in storm,
                    iterations=args.iterations,
                    rounds=args.rounds,
                )
            )

    def go() -> None:
        d = defer.ensureDeferred(run())
        d.addErrback(lambda f: result.setdefault("error", f.getTraceback()))
        d.addBoth(lambda _: reactor.stop())

    reactor.callWhenRunning(go)
    reactor.run()
    if "error" in result:
        print(result["error"], file=sys.stderr)
        return 1
    report(result, args.json)
    return 0


# ----------------------------------------------------------------------------- baseline


def compare(args: argparse.Namespace) -> int:
    """This tree and the baseline, ``--runs`` child runs each, interleaved."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_daemon_scale import baseline_tree

    child = ["--json", "--iterations", str(args.iterations), "--rounds", str(args.rounds)]
    child += ["--present", args.present, "--storm", args.storm]
    child += ["--ab-direct"] if args.ab_direct else []
    runs: dict[str, list[dict[str, Any]]] = {"this": [], "base": []}
    with contextlib.ExitStack() as stack:
        trees = {"this": ROOT}
        if args.baseline_ref:
            trees["base"] = stack.enter_context(baseline_tree(args.baseline_ref))
        else:
            trees["base"] = args.baseline.resolve()
        for r in range(args.runs):
            for name in ("this", "base") if r % 2 == 0 else ("base", "this"):
                env = dict(os.environ, PYTHONPATH=str(trees[name]))
                cmd = [sys.executable, str(Path(__file__).resolve()), *child]
                res = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
                if res.returncode != 0:
                    print(res.stderr, file=sys.stderr)
                    return 1
                runs[name].append(json.loads(res.stdout))
    if args.json:
        print(json.dumps(runs, indent=2))
    else:
        report_compare(runs)
    return 0


def report_compare(runs: dict[str, list[dict[str, Any]]]) -> None:
    """x floor per run (p50 ÷ that run's echo floor) and p99 ÷ p50, base → this."""
    print(
        "x = p50 ÷ the echo floor of the same child run; runs listed; (p99/p50 min-max); "
        "then the median over the runs of p50 (x against the median echo floor of all runs of "
        "both trees) and of the daemon's share (µs)"
    )
    first = runs["this"][0]["sizes"]
    for index, size in enumerate(first):
        if "latency" not in size:
            continue
        floors = [
            r["sizes"][index]["latency"]["floor_echo"]["median_us"]
            for name in ("base", "this")
            for r in runs[name]
        ]
        pooled = statistics.median(floors)
        print(f"  {size['domains']} domains present (pooled echo floor: {pooled:.0f} µs)")
        for key, title in (*_ROWS[2:], ("floor_echo", "floor: raw echo µs")):
            cells = []
            for name in ("base", "this"):
                got = [r["sizes"][index]["latency"].get(key) for r in runs[name]]
                got = [g for g in got if g is not None]
                if not got:
                    break
                if key == "floor_echo":
                    cells.append(" / ".join(f"{g['median_us']:.0f}" for g in got))
                    continue
                xs = " / ".join(f"x{g['x_floor']:.1f}" for g in got)
                tails = [g["p99_us"] / g["median_us"] for g in got]
                cells.append(f"{xs} ({min(tails):.1f}-{max(tails):.1f})")
                p50 = statistics.median(g["median_us"] for g in got)
                inside = statistics.median(g["inside_median_us"] for g in got)
                cells.append(
                    f"p50 {p50:.0f} µs (x{p50 / pooled:.1f} pooled), first event -> "
                    f"decision {inside:.0f} µs"
                )
            if len(cells) == 4:
                print(f"    {title:<38} base {cells[0]:<32} this {cells[2]}")
                print(f"    {'':<38} base {cells[1]:<32} this {cells[3]}")
            elif len(cells) == 2:
                print(f"    {title:<38} base {cells[0]:<32} this {cells[1]}")
        for name in ("base", "this"):
            rounds = [r["sizes"][index]["latency"].get("batch_rounds") for r in runs[name]]
            print(f"    watch batches by read rounds, {name}: {rounds}")


_ROWS = (
    ("floor_echo", "floor: raw echo (write, event, write, event)"),
    ("floor_event_read", "floor: raw event + read"),
    ("admit", "admission: commit -> label node seen"),
    ("vif", "vif: commit -> listener"),
    ("vchan", "vchan: commit -> listener"),
    ("admit" + PLAIN, "admission (watch conn. only)"),
    ("vif" + PLAIN, "vif (watch conn. only)"),
    ("vchan" + PLAIN, "vchan (watch conn. only)"),
)


def report(result: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(result, indent=2))
        return
    rows = _ROWS
    print(
        "decision latency (p50 / p99 µs; x = p50 / echo floor p50, same N, same run, goals "
        "admission x12, vif x4, vchan x3, p99/p50 3; vs N0 = this x / the first N's x)"
    )
    measured = [size for size in result["sizes"] if "latency" in size]
    for size in measured:
        lat = size["latency"]
        rounds = lat.get("batch_rounds", {})
        print(f"  {size['domains']} domains present (watch batches by read rounds: {rounds})")
        print(
            f"    collections during the latency phase: {lat.get('gc_pauses')}; barriers not "
            f"in within the burst wait: {lat.get('barrier_timeouts')}"
        )
        for key, title in rows:
            if key not in lat:
                continue
            s = lat[key]
            x = s.get("x_floor", 1.0)
            vs = x / measured[0]["latency"][key].get("x_floor", 1.0)
            extra = ""
            if key == "admit":
                extra = f"   (commit -> listener {s['listener_median_us']:.0f})"
            elif key.startswith(("vif", "vchan")):
                extra = f"   (first event -> decision {s['inside_median_us']:.0f})"
            tail = s["p99_us"] / s["median_us"]
            print(
                f"    {title:<46} {s['median_us']:7.0f} {s['p99_us']:7.0f}  x{x:<5.1f} "
                f"p99/p50 {tail:<4.1f} vs N0 x{vs:<4.2f}{extra}"
            )
    storms = [s for s in result["sizes"] if "cold_s" in s]
    if not storms:
        return
    print(
        "boot storms (domains x 3 devices; x = per-domain time / that of the first N; "
        "walk = a bare snapshot of the same tree, goal cold / walk <= 1.5; RSS = the "
        "process's growth over the daemon's start, per domain, goal <= 16 KiB)"
    )
    first = storms[0]
    cold1 = first["cold_s"] / first["domains"]
    live1 = first["live_s"] / first["domains"]
    for s in storms:
        n = s["domains"]
        print(
            f"  {n:>5}: cold {s['cold_s']:7.2f} s (x{s['cold_s'] / n / cold1:.2f}; "
            f"÷ walk {s['cold_s'] / s['walk_s']:.2f}; RSS {s['rss_kib_per_domain']:.0f} "
            f"KiB/domain); "
            f"live {s['live_s']:7.2f} s (x{s['live_s'] / n / live1:.2f}; toolstack "
            f"{s['live_create_ms_per_domain']:.0f} ms/domain, daemon lag after the last "
            f"create {s['live_lag_ms']:.0f} ms)"
        )


if __name__ == "__main__":
    if sys.argv[1:2] == ["_writer"]:
        writer(sys.argv[2], int(sys.argv[3]))
    else:
        sys.exit(main())
