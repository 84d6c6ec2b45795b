"""The daemon end to end on a sandbox oxenstored: decision latency, and boot storms.

Every figure is compared with a baseline measured in the same run on the same xenstored
(machines differ; ratios travel):

* **Decision latency**: a client commits the transaction libxl writes to add a vif
  (``libxl__device_add_async``: libxl record, backend and frontend directories) or the one a
  libxenvchan server writes (``ring-ref`` and ``event-channel`` with the client's read
  permission); the time from the commit request until the daemon's decision listener runs
  (watch events → one ``read_many`` → events → host model → engine). Baseline: a raw-socket
  client watching the same tree gets the event of a write and reads the node (one event + one
  read round trip: the least any decision needs). Rounds alternate baseline and daemon;
  samples are pooled.
* **Boot storm, cold**: N domains (each a vif, a vbd and a console, labelled) exist before
  the daemon starts; the time from ``start()`` to everything decided and every label node
  written (one snapshot, N admissions, 3N device decisions, N label transactions). Ratio per
  domain against N = 10.
* **Boot storm, live**: the daemon runs while the toolstack creates N domains back to back;
  how long after the last ``create`` returned the daemon had decided everything (its lag),
  and the toolstack's own time per domain for scale.

Run: .venv/bin/python benchmarks/bench_daemon.py [--iterations 200] [--storm 10,100] [--json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from twisted.internet import defer, threads

from shyped.config import ActuatorConfig, Config, XenstoreConfig
from shyped.daemon import Daemon, load_policy
from shyped.engine import Outcome
from shyped.labelstore import LabelStore
from shyped.sandbox import layout as L
from shyped.sandbox.toolstack import Toolstack
from shyped.sandbox.xenstored import SandboxXenstored, short_instance_dir
from shyped.sandbox.xsconn import XsConn
from shyped.xenstore import GatewayConfig, XenstoreGateway
from shyped.xenstore.rawclient import RawClient
from shyped.xlcfg import domain_config_from_text

ROOT = Path(__file__).resolve().parents[1]
POLICY = ROOT / "conf" / "policies" / "hosting.toml"


class NoActuator:
    """Nothing is vetoed in these runs; an actuator call would be a bug."""

    def pause(self, domid: int) -> defer.Deferred[None]:
        raise AssertionError(f"unexpected pause {domid}")

    unpause = destroy = pause


def labels(n: int) -> LabelStore:
    store = LabelStore().with_domain(name="web-a1", label="bank-a-web")
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


def make_daemon(xsd: SandboxXenstored, store: LabelStore) -> Daemon:
    cfg = config(xsd)
    gateway = XenstoreGateway(GatewayConfig(socket_path=str(xsd.socket_path)))
    return Daemon(cfg, load_policy(cfg.policy), store, gateway=gateway, actuator=NoActuator())


def shop(i: int) -> Any:
    return domain_config_from_text(
        f'name = "shop-{i}"\nuuid = "00000000-0000-4000-8000-{i:012x}"\nmemory = 128\n'
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


def raw_echo_read(socket_path: str, iterations: int) -> list[float]:
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


# ----------------------------------------------------------------------------- decisions


def apply_tx(conn: XsConn, ops: Sequence[Any], before_commit: Any = None) -> None:
    conn.start()
    for op in ops:
        if isinstance(op, L.Write):
            conn.write(op.path, op.value)
        elif isinstance(op, L.SetPerms):
            conn.set_perms(op.path, op.perms)
        elif isinstance(op, L.Mkdir):
            conn.mkdir(op.path)
        elif isinstance(op, L.Rm):
            conn.rm(op.path)
    if before_commit is not None:
        before_commit()
    assert conn.commit()


def transactions(domid: int) -> dict[str, tuple[str, list[Any], list[Any]]]:
    """kind -> (what the daemon decides, the transaction's ops, the ops undoing it)."""
    dev = L.VifDevice(domid=domid, devid=7, mac="00:16:3e:00:00:07", bridge="xenbr-bank-a")
    add = [op for op in L.vif_add_step(dev).ops if not isinstance(op, L.Read)]
    vpath = f"/local/domain/0/data/vchan/{domid}/9"
    vchan = list(L.vchan_server_step(0, domid, vpath, 8, 23).ops)
    vif_dirs = [dev.frontend, dev.backend, L.libxl_device_path(domid, "vif", 7)]
    return {
        "vif": (f"device vif {domid}/7", add, [L.Rm(p) for p in vif_dirs]),
        "vchan": (f"vchan {vpath}", vchan, [L.Rm(vpath)]),
    }


def writer(socket_path: str, domid: int) -> None:
    """Child process: on ``<kind>`` commit that transaction and print the time of the commit
    request; on ``undo <kind>`` undo it. A process of its own, as libxl is: no GIL shared with
    the daemon."""
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
            else:
                apply_tx(conn, txs[words[0]][1], mark)
                print(repr(t0), flush=True)


class Latency:
    """Drive the writer process; time from its commit request to the daemon's decision."""

    def __init__(self, daemon: Daemon, socket_path: str, domid: int) -> None:
        self.daemon = daemon
        self.domid = domid
        self.txs = transactions(domid)
        self.decided: dict[str, float] = {}
        self.received: dict[str, float] = {}
        self.events: dict[str, threading.Event] = {}
        self.samples: dict[str, list[float]] = {"vif": [], "vchan": []}
        #: the daemon's share: from the first watch event of the batch to the decision
        self.inside: dict[str, list[float]] = {"vif": [], "vchan": []}
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
        """Worker thread: alternate vif adds and vchan publications, each undone after."""
        for _ in range(iterations):
            for kind, (what, _ops, _undo) in self.txs.items():
                self.decided.pop(what, None)
                self.events[what] = done = threading.Event()
                t0 = float(self.ask(kind))
                if not done.wait(10):
                    raise RuntimeError(f"no decision on {what}")
                self.samples[kind].append(self.decided[what] - t0)
                self.inside[kind].append(self.decided[what] - self.received[what])
                del self.events[what]
                self.ask(f"undo {kind}")
                threads.blockingCallFromThread(reactor, self.daemon.settled)

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.proc.wait(10)


async def bench_latency(reactor: Any, iterations: int, rounds: int) -> dict[str, Any]:
    directory = short_instance_dir("bench-daemon")
    xsd = SandboxXenstored(directory)
    xsd.start()
    try:
        ts = Toolstack(xsd.socket_path)
        ts.boot_host()
        web = ts.create(
            domain_config_from_text(
                'name = "web-a1"\nuuid = "00000000-0000-4000-8000-0000000000a1"\n'
            )
        )
        daemon = make_daemon(xsd, labels(0))
        await daemon.start()
        await daemon.settled()
        lat = Latency(daemon, str(xsd.socket_path), web)
        base: list[float] = []
        per = max(1, iterations // rounds)
        for _ in range(rounds):
            base += await threads.deferToThread(raw_echo_read, str(xsd.socket_path), per)
            await threads.deferToThread(lat.round, reactor, per)
        lat.close()
        await daemon.stop()
    finally:
        xsd.stop()
        shutil.rmtree(directory, ignore_errors=True)
    b = stats(base)
    out: dict[str, Any] = {"baseline_echo_read": b}
    for kind, samples in lat.samples.items():
        s = stats(samples)
        s["x_baseline"] = s["median_us"] / b["median_us"]
        s["inside_median_us"] = statistics.median(lat.inside[kind]) * 1e6
        out[f"decision_{kind}"] = s
    return out


# ----------------------------------------------------------------------------- boot storms


async def bench_storm(reactor: Any, n: int) -> dict[str, float]:
    directory = short_instance_dir("bench-storm")
    xsd = SandboxXenstored(directory)
    xsd.start()
    try:
        ts = Toolstack(xsd.socket_path)
        ts.boot_host()
        t = time.perf_counter()
        for i in range(n):
            ts.create(shop(i))
        create_s = time.perf_counter() - t
        daemon = make_daemon(xsd, labels(2 * n))
        decided: list[Outcome] = []
        daemon.add_listener(decided.append)
        t = time.perf_counter()
        await daemon.start()
        await daemon.settled()
        cold = time.perf_counter() - t
        assert sum(1 for o in decided if o.kind == "domain" and o.allowed) == n, "cold storm"
        # Live: the daemon runs while n more domains are created back to back.
        before = len(decided)
        t = time.perf_counter()
        await threads.deferToThread(lambda: [ts.create(shop(n + i)) for i in range(n)])
        created = time.perf_counter()
        await daemon.settled()
        lag = time.perf_counter() - created
        live_create = created - t
        assert sum(1 for o in decided[before:] if o.kind == "domain") == n, "live storm"
        await daemon.stop()
    finally:
        xsd.stop()
        shutil.rmtree(directory, ignore_errors=True)
    return {
        "domains": n,
        "cold_s": cold,
        "cold_ms_per_domain": cold / n * 1e3,
        "toolstack_create_ms_per_domain": create_s / n * 1e3,
        "live_create_ms_per_domain": live_create / n * 1e3,
        "live_lag_ms": lag * 1e3,
    }


# ----------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--iterations", type=int, default=200, help="decisions per kind")
    parser.add_argument("--rounds", type=int, default=4, help="baseline/daemon alternations")
    parser.add_argument("--storm", default="10,100", help="domain counts for the storms")
    parser.add_argument("--json", action="store_true", help="print JSON only")
    args = parser.parse_args(argv)
    sizes = [int(x) for x in args.storm.split(",") if x]
    result: dict[str, Any] = {}
    from twisted.internet import reactor as _reactor

    reactor: Any = _reactor

    async def run() -> None:
        result["latency"] = await bench_latency(reactor, args.iterations, args.rounds)
        result["storm"] = [await bench_storm(reactor, n) for n in sizes]

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


def report(result: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(result, indent=2))
        return
    lat = result["latency"]
    b = lat["baseline_echo_read"]
    print("decision latency (median / p90 / p99 µs; x = median / baseline median)")
    print(f"  baseline: raw watch event + read {b['median_us']:8.0f} {b['p90_us']:8.0f} "
          f"{b['p99_us']:8.0f}")  # fmt: skip
    for kind in ("vif", "vchan"):
        s = lat[f"decision_{kind}"]
        print(f"  {kind:<5} decision (n={s['n']:.0f})        {s['median_us']:8.0f} "
              f"{s['p90_us']:8.0f} {s['p99_us']:8.0f}   x{s['x_baseline']:.1f}"
              f"   (first event -> decision: {s['inside_median_us']:.0f})")  # fmt: skip
    print("boot storms")
    storms = result["storm"]
    first = storms[0]["cold_ms_per_domain"] if storms else 1.0
    for s in storms:
        print(
            f"  {s['domains']:>5} domains: cold start {s['cold_s'] * 1e3:8.0f} ms "
            f"({s['cold_ms_per_domain']:.2f} ms/domain, x{s['cold_ms_per_domain'] / first:.2f}"
            f" per domain vs the first); live: toolstack {s['live_create_ms_per_domain']:.1f} "
            f"ms/domain, daemon lag after the last create {s['live_lag_ms']:.0f} ms"
        )


if __name__ == "__main__":
    if sys.argv[1:2] == ["_writer"]:
        writer(sys.argv[2], int(sys.argv[3]))
    else:
        sys.exit(main())
