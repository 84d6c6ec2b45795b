"""Cost of the metrics endpoint with 10, 1,000 and 5,000 domains.

Each host model is built from synthetic xenstore nodes through the real parser
(`shyped.core.assembler.EventAssembler`) and host model: per domain what libxl, the backends and the
guest write (name, vm, /vm/<uuid>, memory/*, cpu/*, a vif with split channels, a vbd and
console 0 with their rings), every decision allowed, labels cycling over four VM labels with
quotas. Then, per size:

* **publish**: what the reactor pays after a batch (`MetricsState.publish`: per-domain accounts,
  quota table, one frozen snapshot);
* **scrape (new snapshot)**: `generate_latest` on the registry right after a publish (the
  collector builds the families, reusing the samples of unchanged accounts, then
  prometheus_client formats them) — on the scrape thread;
* **scrape (same snapshot)**: a second scrape of the same snapshot (families cached);
* **HTTP scrape**: GET /metrics from the Twisted server (WSGI resource on the reactor's pool),
  timed from a client thread, new snapshot each time (accounts unchanged, as between two
  publications of a steady host); **lag1** / **lag** are the worst lateness of a 5 ms reactor
  timer during the first scrape (every domain's samples built: a burst of allocations that can
  set off a full garbage collection, which stops every thread) and during the later ones.

Costs grow with the number of series, i.e. linearly with the domains; the ratio columns divide
each figure by the 10-domain one measured in the same run (per-domain cost = ratio / (N/10)).

Run: .venv/bin/python benchmarks/bench_metrics.py [--sizes 10 1000 5000] [--repeat 5]
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
import urllib.request
from collections.abc import Callable
from typing import Any

from prometheus_client import generate_latest
from twisted.internet import defer, task, threads

from shyped.core.assembler import EventAssembler
from shyped.core.host import HostModel
from shyped.core.hostfacts import NeedsDecision
from shyped.policy.decisions import Decision, Hook, Rule
from shyped.policy.model import Policy, PolicyVersion, Quota, VmLabel
from shyped.service.config import MetricsConfig
from shyped.service.metrics import MetricsState, start_metrics_server
from shyped.service.metricsfamilies import make_registry

Node = tuple[str, bytes | None, list[bytes] | None]
LABELS = ("web", "db", "batch", "shop")


def policy() -> Policy:
    quota = Quota(max_domains=10_000, max_memory_mib=4096, max_vcpus=8, max_devices=8)
    return Policy(
        "bench",
        PolicyVersion(1, 0),
        "dom0",
        ste_types=("s",),
        vm_labels=(VmLabel("dom0", {"s"}), *(VmLabel(n, {"s"}, quota=quota) for n in LABELS)),
    )


def domain_nodes(d: int) -> list[Node]:
    """What a Xen 4.17 host writes for one connected PV guest (cf. layout-connected.txt)."""
    uuid = f"00000000-0000-4000-8000-{d:012x}"
    home, lx = f"/local/domain/{d}", f"/libxl/{d}"
    nodes: list[Node] = [
        (f"{home}/name", f"guest{d}".encode(), None),
        (f"{home}/vm", f"/vm/{uuid}".encode(), None),
        (f"/vm/{uuid}", b"", None),
        (f"{lx}/type", b"pv", None),
        (f"{home}/memory/static-max", b"262144", None),
        (f"{home}/memory/target", b"131072", None),
        (f"{home}/cpu/0/availability", b"online", None),
        (f"{home}/cpu/1/availability", b"offline", None),
    ]
    for kind, devid, res_key, res, rings in (
        ("vif", 0, "bridge", b"xenbr0", ("tx-ring-ref", "rx-ring-ref", "event-channel-tx")),
        ("vbd", 51712, "params", b"/img", ("ring-ref", "event-channel")),
    ):
        fe, be = f"{home}/device/{kind}/{devid}", f"/local/domain/0/backend/{kind}/{d}/{devid}"
        nodes += [
            (f"{lx}/device/{kind}/{devid}/frontend", fe.encode(), None),
            (f"{lx}/device/{kind}/{devid}/backend", be.encode(), None),
            (f"{lx}/device/{kind}/{devid}/{res_key}", res, None),
            (f"{be}/state", b"4", None),
            (f"{be}/online", b"1", None),
            (f"{fe}/state", b"4", None),
        ]
        nodes += [(f"{fe}/{key}", str(500 + i).encode(), None) for i, key in enumerate(rings)]
    con, cbe = f"{home}/console", f"/local/domain/0/backend/console/{d}/0"
    nodes += [
        (f"{lx}/device/console/0/frontend", con.encode(), None),
        (f"{lx}/device/console/0/backend", cbe.encode(), None),
        (f"{cbe}/state", b"1", None),
        (f"{cbe}/online", b"1", None),
        (f"{con}/ring-ref", b"260098", None),
        (f"{con}/port", b"2", None),
    ]
    return nodes


def build(n: int, state: MetricsState) -> HostModel:
    asm, model = EventAssembler(), HostModel(dom0_label="dom0")
    for d in range(1, n + 1):
        events = asm.feed_batch(domain_nodes(d))
        state.observe_events(events)
        queue = [o for o in model.apply_all(events) if isinstance(o, NeedsDecision)]
        while queue:
            need = queue.pop()
            hook = {"domain": Hook.DOMAIN_ADMIT, "device": Hook.DEVICE_CHANNEL}.get(
                need.kind, Hook.VCHAN
            )
            state.observe_decision(Decision(True, hook, Rule.STE, "bench"), 0.0002)
            label = LABELS[d % len(LABELS)] if need.kind == "domain" else None
            queue.extend(model.record_decision(need, True, label=label))
    return model


def median_time(fn: Callable[[], Any], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        gc.collect()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure(n: int, repeat: int) -> dict[str, float]:
    state = MetricsState()
    state.set_policy(policy(), "0" * 64, time.time())
    state.set_mode("enforcing")
    state.set_xenstore(True, 0)
    t0 = time.perf_counter()
    model = build(n, state)
    build_s = time.perf_counter() - t0
    registry = make_registry(lambda: state.snapshot, process=False)

    publish = median_time(lambda: state.publish(model), repeat)

    def fresh_scrape() -> bytes:
        state.publish(model)
        t = time.perf_counter()
        body = generate_latest(registry)
        fresh_times.append(time.perf_counter() - t)
        return body

    fresh_times: list[float] = []
    body = b""
    for _ in range(repeat):
        gc.collect()
        body = fresh_scrape()
    cold = statistics.median(fresh_times)
    cached = median_time(lambda: generate_latest(registry), repeat)
    series = sum(1 for line in body.splitlines() if line and not line.startswith(b"#"))
    return {
        "build": build_s,
        "publish": publish,
        "cold": cold,
        "cached": cached,
        "series": series,
        "bytes": len(body),
    }


class LagProbe:
    """A 5 ms reactor timer recording how late it fires at worst."""

    PERIOD = 0.005

    def __init__(self) -> None:
        self.worst = 0.0
        self._last = 0.0
        self._loop = task.LoopingCall(self._tick)

    def _tick(self) -> None:
        now = time.perf_counter()
        self.worst = max(self.worst, now - self._last - self.PERIOD)
        self._last = now

    def start(self) -> None:
        self._last = time.perf_counter()
        self._loop.start(self.PERIOD, now=False)

    def stop(self) -> None:
        self._loop.stop()


async def http_scrapes(
    reactor: Any, sizes: list[int], repeat: int
) -> dict[int, tuple[float, float, float]]:
    """GET /metrics from the real Twisted server, a new snapshot before each request: the
    median time (without the first scrape), and the reactor's worst lag (a 5 ms timer's
    lateness) during the first scrape and during the others."""
    out: dict[int, tuple[float, float, float]] = {}
    for n in sizes:
        state = MetricsState()
        state.set_policy(policy(), "0" * 64, time.time())
        model = build(n, state)
        registry = make_registry(lambda s=state: s.snapshot, process=False)
        port = start_metrics_server(
            reactor, MetricsConfig(True, "127.0.0.1", 0, allow_unauthenticated=True), registry
        )
        url = f"http://127.0.0.1:{port.getHost().port}/metrics"

        def get(u: str = url) -> float:
            t = time.perf_counter()
            with urllib.request.urlopen(u, timeout=120) as resp:
                resp.read()
            return time.perf_counter() - t

        times = []
        first, later = LagProbe(), LagProbe()
        for i in range(repeat + 1):
            state.publish(model)
            gc.collect()
            probe = first if i == 0 else later
            probe.start()
            took = await threads.deferToThread(get)
            probe.stop()
            if i:
                times.append(took)  # the first scrape builds every domain's samples
        out[n] = (statistics.median(times), first.worst, later.worst)
        await port.stopListening()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[10, 1000, 5000], help="domain counts")
    ap.add_argument("--repeat", type=int, default=5, help="timed repetitions (median reported)")
    ap.add_argument("--no-http", action="store_true", help="skip the scrapes over HTTP")
    args = ap.parse_args()
    task.react(lambda reactor: defer.ensureDeferred(run(reactor, args)))


async def run(reactor: Any, args: argparse.Namespace) -> None:
    sizes = sorted(set(args.sizes))
    results = {n: measure(n, args.repeat) for n in sizes}
    http = {} if args.no_http else await http_scrapes(reactor, sizes, args.repeat)
    base_n = sizes[0]
    base = results[base_n]
    print(f"metrics endpoint cost (median of {args.repeat}; ratios against {base_n} domains)")
    cols = ("publish", "cold", "cached")
    head = f"{'domains':>8} {'series':>8} {'KiB':>8}"
    head += "".join(f" {c + ' ms':>12} {'x':>7}" for c in (*cols, "http"))
    head += f" {'lag1 ms':>10} {'lag ms':>10}"
    print(head)
    for n in sizes:
        r = results[n]
        line = f"{n:>8} {int(r['series']):>8} {r['bytes'] / 1024:>8.0f}"
        for c in cols:
            line += f" {r[c] * 1e3:>12.2f} {r[c] / base[c]:>7.1f}"
        if http:
            t, lag0, lag = http[n]
            line += f" {t * 1e3:>12.2f} {t / http[base_n][0]:>7.1f}"
            line += f" {lag0 * 1e3:>10.1f} {lag * 1e3:>10.1f}"
        print(line)
    big = sizes[-1]
    r = results[big]
    print(
        f"per domain at {big}: publish {r['publish'] / big * 1e6:.1f} µs, "
        f"scrape {r['cold'] / big * 1e6:.1f} µs (new snapshot), "
        f"{r['cached'] / big * 1e6:.1f} µs (same snapshot); "
        f"model built from {big} domains' nodes in {r['build']:.1f} s"
    )


if __name__ == "__main__":
    main()
