"""Cost of a scrape at 1,000 and 5,000 domains: the endpoint now against the collector before
metering v2 (issue 16), both measured in the same run.

Each host model is built from synthetic xenstore nodes through the real parser
(`shyped.core.assembler.EventAssembler`) and host model: per domain what libxl, the backends and the
guest write (name, vm, /vm/<uuid>, memory/*, cpu/*, a vif with split channels, a vbd and
console 0 with their rings), every decision allowed, labels cycling over four VM labels with
quotas. Then, per size:

* **publish**: what the reactor pays after a batch (`MetricsState.publish`: per-domain accounts,
  quota table, one frozen snapshot);
* **scrape**: the exposition text right after a publish (a new snapshot, the accounts
  unchanged, as between two publications of a steady host), on the calling thread:
  *before* is ``generate_latest`` over the old collector (`metrics_baseline.py`, a copy of
  the collector as it was: identity labels on every series, prometheus_client formatting every
  sample), *now* `shyped.service.metricstext.Exposition` (per-domain text cached, rendered
  again only for domains that changed); *first* is the first scrape of each (every domain
  rendered);
* **HTTP**: GET /metrics from a Twisted server on the reactor's thread pool (the old one served
  by prometheus_client's ``make_wsgi_app`` over the old collector, the new one by
  `start_metrics_server`), fetched by ``curl`` in a child process (the scraper is another
  process, as Prometheus is), a new snapshot before each request;
  **lag1** / **lag** are the worst lateness of a 5 ms reactor timer during the first scrape and
  during the later ones; **idle lag** the same timer's worst lateness for as long as a scrape
  takes with no scrape at all (the machine's own noise: the benchmark shares two cores).

Ratios are now / before (smaller is better), measured in the same run on the same machine.

Run: .venv/bin/python benchmarks/bench_metrics.py [--sizes 1000 5000] [--repeat 5]
"""

from __future__ import annotations

import argparse
import gc
import shutil
import statistics
import subprocess
import time
import urllib.request
from collections.abc import Callable
from typing import Any

from metrics_baseline import MetricsCollector as BaselineCollector
from prometheus_client import generate_latest, make_wsgi_app
from prometheus_client.registry import CollectorRegistry
from twisted.internet import defer, task, threads
from twisted.web.resource import Resource
from twisted.web.server import Site
from twisted.web.wsgi import WSGIResource

from shyped.core.assembler import EventAssembler
from shyped.core.host import HostModel
from shyped.core.hostfacts import NeedsDecision
from shyped.policy.decisions import Decision, Hook, Rule
from shyped.policy.model import Policy, PolicyVersion, Quota, VmLabel
from shyped.service.config import MetricsConfig
from shyped.service.metrics import MetricsState
from shyped.service.metricsfamilies import make_registry
from shyped.service.metricstext import Exposition
from shyped.service.metricsweb import start_metrics_server

Node = tuple[str, bytes | None, list[bytes] | None]
CURL = shutil.which("curl")
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


def baseline_registry(state: MetricsState) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(BaselineCollector(lambda: state.snapshot))
    return registry


def new_state(n: int) -> tuple[MetricsState, HostModel]:
    state = MetricsState()
    state.set_policy(policy(), "0" * 64, time.time())
    state.set_mode("enforcing")
    state.set_xenstore(True, 0)
    return state, build(n, state)


def measure(n: int, repeat: int) -> dict[str, float]:
    state, model = new_state(n)
    publish = median_time(lambda: state.publish(model), repeat)
    out: dict[str, float] = {"publish": publish}

    def before() -> Callable[[], bytes]:
        registry = baseline_registry(state)
        return lambda: generate_latest(registry)

    def now() -> Callable[[], bytes]:
        exposition = Exposition(make_registry(lambda: state.snapshot, process=False))
        return lambda: exposition.render(None)[0]

    scrapers = {"before": before, "now": now}
    for which, make in scrapers.items():
        scrape = make()
        state.publish(model)
        gc.collect()
        t = time.perf_counter()
        body = scrape()
        out[f"{which} first"] = time.perf_counter() - t
        times = []
        for _ in range(repeat):
            state.publish(model)
            gc.collect()
            t = time.perf_counter()
            body = scrape()
            times.append(time.perf_counter() - t)
        out[which] = statistics.median(times)
        out[f"{which} series"] = sum(
            1 for line in body.splitlines() if line and not line.startswith(b"#")
        )
        out[f"{which} bytes"] = len(body)
    return out


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


def listen_baseline(reactor: Any, state: MetricsState) -> Any:
    """The endpoint as it was: prometheus_client's WSGI app over the old collector."""
    root = Resource()  # type: ignore[no-untyped-call]
    app = make_wsgi_app(baseline_registry(state))
    wsgi = WSGIResource(reactor, reactor.getThreadPool(), app)  # type: ignore[no-untyped-call]
    root.putChild(b"metrics", wsgi)
    return reactor.listenTCP(0, Site(root), interface="127.0.0.1")  # type: ignore[no-untyped-call]


async def http_scrapes(
    reactor: Any, sizes: list[int], repeat: int
) -> dict[tuple[int, str], tuple[float, float, float]]:
    """GET /metrics from the real Twisted servers, a new snapshot before each request: the
    median time (without the first scrape), and the reactor's worst lag (a 5 ms timer's
    lateness) during the first scrape and during the others."""
    out: dict[tuple[int, str], tuple[float, float, float]] = {}
    for n in sizes:
        for which in ("before", "now"):
            state, model = new_state(n)
            if which == "now":
                registry = make_registry(lambda s=state: s.snapshot, process=False)
                config = MetricsConfig(True, "127.0.0.1", 0, allow_unauthenticated=True)
                port = start_metrics_server(reactor, config, registry)
            else:
                port = listen_baseline(reactor, state)
            url = f"http://127.0.0.1:{port.getHost().port}/metrics"

            def get(u: str = url) -> float:
                """The scraper is another process, as Prometheus is: a client thread in this
                one would compete with the reactor for the GIL and overstate its lag."""
                t = time.perf_counter()
                if CURL is not None:
                    subprocess.run(
                        [CURL, "-sSf", "-o", "/dev/null", "--max-time", "120", u], check=True
                    )
                else:
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
                    times.append(took)  # the first scrape renders every domain
            out[n, which] = (statistics.median(times), first.worst, later.worst)
            if which == "now":  # control: the same probe with no scrape, as long as one
                idle = LagProbe()
                idle.start()
                await task.deferLater(reactor, statistics.median(times), lambda: None)
                idle.stop()
                out[n, "idle"] = (0.0, idle.worst, idle.worst)
            await port.stopListening()
            del state, model
            gc.collect()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 5000], help="domain counts")
    ap.add_argument("--repeat", type=int, default=5, help="timed repetitions (median reported)")
    ap.add_argument("--no-http", action="store_true", help="skip the scrapes over HTTP")
    args = ap.parse_args()
    task.react(lambda reactor: defer.ensureDeferred(run(reactor, args)))


async def run(reactor: Any, args: argparse.Namespace) -> None:
    sizes = sorted(set(args.sizes))
    results = {n: measure(n, args.repeat) for n in sizes}
    http = {} if args.no_http else await http_scrapes(reactor, sizes, args.repeat)
    print(f"metrics scrape, before (issue 16) vs now, median of {args.repeat}; x = now/before")
    print(
        f"{'domains':>8} {'series b/n':>15} {'KiB b/n':>13} {'publish ms':>10} "
        f"{'first ms b/n':>15} {'x':>6} {'scrape ms b/n':>15} {'x':>6}"
    )
    for n in sizes:
        r = results[n]
        print(
            f"{n:>8} {int(r['before series']):>7}/{int(r['now series']):<7} "
            f"{r['before bytes'] / 1024:>6.0f}/{r['now bytes'] / 1024:<6.0f} "
            f"{r['publish'] * 1e3:>10.1f} "
            f"{r['before first'] * 1e3:>7.0f}/{r['now first'] * 1e3:<7.0f} "
            f"{r['now first'] / r['before first']:>6.2f} "
            f"{r['before'] * 1e3:>7.1f}/{r['now'] * 1e3:<7.1f} {r['now'] / r['before']:>6.3f}"
        )
    if http:
        print(
            f"{'domains':>8} {'HTTP ms b/n':>17} {'x':>6} {'lag1 ms b/n':>15} {'lag ms b/n':>13}"
            f" {'idle lag ms':>11}"
        )
        for n in sizes:
            (tb, l1b, lb), (tn, l1n, ln) = http[n, "before"], http[n, "now"]
            print(
                f"{n:>8} {tb * 1e3:>8.1f}/{tn * 1e3:<8.1f} {tn / tb:>6.3f} "
                f"{l1b * 1e3:>7.1f}/{l1n * 1e3:<7.1f} {lb * 1e3:>6.1f}/{ln * 1e3:<6.1f}"
                f" {http[n, 'idle'][1] * 1e3:>11.1f}"
            )


if __name__ == "__main__":
    main()
