"""Prometheus metrics: what the reactor records, a frozen snapshot, a collector, the HTTP endpoint.

Threads. The daemon's state lives on the reactor thread; Twisted's WSGI resource answers a
scrape on a pool thread. So the two never share mutable state: `MetricsState` (reactor thread
only) accumulates counters and, on `MetricsState.publish`, builds one immutable
`MetricsSnapshot` and swaps a single reference to it (atomic in CPython). `MetricsCollector`
only ever reads that reference, once per scrape, so a scrape sees one consistent moment and
never a half-applied batch, and it takes no lock the reactor could wait on. Publishing rebuilds
the accounts of the domains that changed since the last one (`shyped.core.accounting.AccountCache`)
and passes once over the domain list; call it after a batch, or let `PeriodicPublisher` do it
at most once per interval.

Names follow the Prometheus conventions: ``shyped_`` prefix, base units (bytes, seconds),
``_total`` counters, ``_info`` metrics for text facts. Label values come from closed sets (hook,
decision, rule, quota kind, device kind, domain state) or from the domains themselves; a
decision's ``reason`` label is its *rule*, never the free-text reason. Per-domain series carry
``domain`` (name), ``domid``, ``uuid`` and ``label`` and disappear with the domain. The metric
list is in ``docs/metrics.md`` and `METRIC_NAMES`.

CPU time per domain comes from an optional `XlCpuProvider` (``xl list -v`` run periodically as
a child process, never on the reactor's time): without a hypervisor, as on the sandbox, ``xl``
fails and there is simply no ``shyped_domain_cpu_seconds_total`` series.
"""

from __future__ import annotations

import bisect
import contextlib
import math
import os
import re
import shutil
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Final

import attrs
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector, CollectorRegistry
from prometheus_client.samples import Sample
from prometheus_client.utils import floatToGoString
from twisted.internet import error as twisted_error
from twisted.internet import protocol
from twisted.internet.defer import Deferred
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

import shyped
from shyped.core.accounting import AccountCache, DomainAccount, HostAccount
from shyped.core.events import Event
from shyped.core.host import HostModel
from shyped.core.quota import QuotaUsage, quota_table
from shyped.policy.decisions import Decision
from shyped.policy.model import Policy
from shyped.service.config import Mode
from shyped.service.metricsweb import check_loopback as check_loopback
from shyped.service.metricsweb import start_metrics_server as start_metrics_server

_log = Logger(namespace="shyped.metrics")

#: Decision latency buckets (seconds): a pure policy check takes microseconds, a decision that
#: waits for xenstore round trips (~0.1 ms each) or a toolstack command much longer.
LATENCY_BUCKETS: Final = (
    0.00005,
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
#: Distinct watch event kinds kept; further kinds are counted as ``other``.
MAX_EVENT_KINDS: Final = 64
#: The labels of every per-domain series.
DOMAIN_LABELS: Final = ("domain", "domid", "uuid", "label")

_SNAKE: Final = re.compile(r"(?<!^)(?=[A-Z])")


def event_kind(event: Event) -> str:
    """``DomainAppeared`` → ``domain_appeared``: the ``kind`` label of a typed event."""
    return _SNAKE.sub("_", type(event).__name__).lower()


# ---- the snapshot ---------------------------------------------------------------------------


@attrs.frozen
class PolicyInfo:
    """The active policy as metrics show it."""

    name: str
    version: str
    sha256: str
    loaded_at: float


@attrs.frozen
class LatencyHistogram:
    """Decision latencies of one hook: per-bucket counts (`LATENCY_BUCKETS`, then +Inf)."""

    hook: str
    counts: tuple[int, ...]
    total: float

    @property
    def count(self) -> int:
        return sum(self.counts)


@attrs.frozen
class CpuTime:
    """CPU time a domain has used (``xl list``), matched to the model's domain."""

    domid: int
    seconds: float


@attrs.frozen
class MetricsSnapshot:
    """Everything a scrape shows, frozen at `published_at` (reactor-built, read anywhere)."""

    published_at: float
    #: (hook, decision, rule, count), sorted.
    decisions: tuple[tuple[str, str, str, int], ...] = ()
    latency: tuple[LatencyHistogram, ...] = ()
    policy: PolicyInfo | None = None
    mode: str | None = None
    xenstore_up: bool | None = None
    xenstore_reconnects: int = 0
    #: (kind, count), sorted.
    watch_events: tuple[tuple[str, int], ...] = ()
    host: HostAccount | None = None
    quotas: tuple[QuotaUsage, ...] = ()
    #: None: no CPU time provider, or it failed (no series at all).
    cpu: tuple[CpuTime, ...] | None = None
    #: Domain vetoes that failed and are being retried; failed veto attempts so far.
    vetoes_pending: int = 0
    veto_failures: int = 0


#: What a scrape shows before the daemon published anything.
EMPTY_SNAPSHOT: Final = MetricsSnapshot(published_at=0.0)


# ---- the reactor side -----------------------------------------------------------------------


@attrs.frozen
class XlDomain:
    """One line of ``xl list -v``."""

    name: str
    domid: int
    uuid: str | None
    cpu_seconds: float


class MetricsState:
    """What the daemon tells the metrics; mutable, reactor thread only (see module docstring)."""

    def __init__(self, *, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._decisions: dict[tuple[str, str, str], int] = {}
        self._latency: dict[str, tuple[list[int], list[float]]] = {}
        self._policy: Policy | None = None
        self._policy_info: PolicyInfo | None = None
        self._mode: str | None = None
        self._xs_up: bool | None = None
        self._xs_reconnects = 0
        self._events: dict[str, int] = {}
        self._cpu: Sequence[XlDomain] | None = None
        self._vetoes: tuple[int, int] = (0, 0)
        self._snapshot: MetricsSnapshot = EMPTY_SNAPSHOT
        self._accounts = AccountCache()
        self.dirty = True

    @property
    def snapshot(self) -> MetricsSnapshot:
        """The last published snapshot (any thread may read it)."""
        return self._snapshot

    def observe_decision(self, decision: Decision, latency_s: float | None = None) -> None:
        """Count a decision (hook, permit/deny, rule) and, if given, how long it took."""
        key = (str(decision.hook), decision.verdict, str(decision.rule))
        self._decisions[key] = self._decisions.get(key, 0) + 1
        if latency_s is not None and latency_s >= 0 and math.isfinite(latency_s):
            hist = self._latency.get(key[0])
            if hist is None:
                hist = self._latency[key[0]] = ([0] * (len(LATENCY_BUCKETS) + 1), [0.0])
            hist[0][bisect.bisect_left(LATENCY_BUCKETS, latency_s)] += 1
            hist[1][0] += latency_s
        self.dirty = True

    def observe_watch_events(self, kind: str, n: int = 1) -> None:
        """Count `n` watch events of `kind` (at most `MAX_EVENT_KINDS` kinds, then ``other``)."""
        if kind not in self._events and len(self._events) >= MAX_EVENT_KINDS:
            kind = "other"
        self._events[kind] = self._events.get(kind, 0) + n
        self.dirty = True

    def observe_events(self, events: Iterable[Event]) -> None:
        """Count typed events by kind (`event_kind`)."""
        for e in events:
            self.observe_watch_events(event_kind(e))

    def set_policy(self, policy: Policy, sha256: str, loaded_at: float) -> None:
        """The active policy (its quotas feed the usage series), its file hash, when loaded."""
        self._policy = policy
        self._policy_info = PolicyInfo(policy.name, str(policy.version), sha256, loaded_at)
        self.dirty = True

    def set_mode(self, mode: Mode | str) -> None:
        self._mode = mode.value if isinstance(mode, Mode) else Mode(mode).value
        self.dirty = True

    def set_xenstore(self, connected: bool, reconnects: int) -> None:
        self._xs_up = connected
        self._xs_reconnects = reconnects
        self.dirty = True

    def set_vetoes(self, pending: int, failures: int) -> None:
        """Domain vetoes pending a retry, and failed veto attempts so far."""
        if (pending, failures) != self._vetoes:
            self._vetoes = (pending, failures)
            self.dirty = True

    def set_cpu_times(self, domains: Sequence[XlDomain] | None) -> None:
        """What the CPU time provider last read (None: not available)."""
        self._cpu = domains
        self.dirty = True

    def publish(self, model: HostModel | None) -> MetricsSnapshot:
        """Build a frozen snapshot of everything (and the model's domains) and swap it in."""
        host = self._accounts.host(model) if model is not None else None
        quotas: tuple[QuotaUsage, ...] = ()
        if host is not None and self._policy is not None:
            quotas = quota_table(self._policy, host)
        cpu = None
        if self._cpu is not None and host is not None:
            cpu = tuple(_match_cpu(self._cpu, host))
        latency = tuple(
            LatencyHistogram(hook, tuple(counts), total[0])
            for hook, (counts, total) in sorted(self._latency.items())
        )
        snap = MetricsSnapshot(
            published_at=self._clock(),
            decisions=tuple(sorted((*k, n) for k, n in self._decisions.items())),
            latency=latency,
            policy=self._policy_info,
            mode=self._mode,
            xenstore_up=self._xs_up,
            xenstore_reconnects=self._xs_reconnects,
            watch_events=tuple(sorted(self._events.items())),
            host=host,
            quotas=quotas,
            cpu=cpu,
            vetoes_pending=self._vetoes[0],
            veto_failures=self._vetoes[1],
        )
        self._snapshot = snap  # the one atomic swap the collector sees
        self.dirty = False
        return snap


def _match_cpu(rows: Sequence[XlDomain], host: HostAccount) -> Iterable[CpuTime]:
    """CPU times for the model's domains: same domid and, where both are known, same uuid."""
    for row in rows:
        acc = host.domain(row.domid)
        if acc is None:
            continue
        if acc.uuid is not None and row.uuid is not None and acc.uuid != row.uuid:
            continue  # another incarnation under the same id
        yield CpuTime(row.domid, row.cpu_seconds)


class PeriodicPublisher:
    """Publish at most every `interval` seconds, and only when something was observed.

    The model changes with every batch but the daemon need not walk every domain per batch:
    call `mark` after a batch and let this publish on the reactor's clock.
    """

    def __init__(
        self,
        reactor: Any,
        state: MetricsState,
        get_model: Callable[[], HostModel | None],
        interval: float = 1.0,
    ) -> None:
        self._state = state
        self._get_model = get_model
        self._loop = LoopingCall(self._tick)
        self._loop.clock = reactor
        self._interval = interval

    def mark(self) -> None:
        """The model changed (a batch was applied)."""
        self._state.dirty = True

    def _tick(self) -> None:
        if self._state.dirty:
            self._state.publish(self._get_model())

    def start(self) -> None:
        self._loop.start(self._interval, now=True)

    def stop(self) -> None:
        if self._loop.running:
            self._loop.stop()


# ---- the collector (scrape thread) ----------------------------------------------------------


#: Every metric family the collector can expose (sample names add _total, _bucket, …).
METRIC_NAMES: Final = (
    "shyped_build_info",
    "shyped_metrics_published_timestamp_seconds",
    "shyped_vetoes_pending",
    "shyped_veto_failures_total",
    "shyped_decisions_total",
    "shyped_decision_latency_seconds",
    "shyped_policy_info",
    "shyped_policy_loaded_timestamp_seconds",
    "shyped_enforcement_mode",
    "shyped_xenstore_up",
    "shyped_xenstore_reconnects_total",
    "shyped_watch_events_total",
    "shyped_domains",
    "shyped_unattributed_garbage_writes_total",
    "shyped_domain_info",
    "shyped_domain_memory_target_bytes",
    "shyped_domain_memory_max_bytes",
    "shyped_domain_vcpus",
    "shyped_domain_vcpus_online",
    "shyped_domain_devices",
    "shyped_domain_backend_devices",
    "shyped_domain_event_channels",
    "shyped_domain_grant_refs",
    "shyped_domain_vchans",
    "shyped_domain_garbage_writes_total",
    "shyped_domain_garbage_limit_hits_total",
    "shyped_domain_decisions_total",
    "shyped_domain_cpu_seconds_total",
    "shyped_quota_limit",
    "shyped_quota_used",
)


def _dom_labels(acc: DomainAccount) -> list[str]:
    return [acc.name or "", str(acc.domid), acc.uuid or "", acc.label or ""]


def _per_domain_gauge(name: str, doc: str, extra: Sequence[str] = ()) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, labels=[*DOMAIN_LABELS, *extra])


def families(snap: MetricsSnapshot, cache: SampleCache | None = None) -> list[Metric]:
    """The metric families of one snapshot (pure; see `MetricsCollector` for the caches)."""
    return _families(snap, cache)[0]


def _families(
    snap: MetricsSnapshot, cache: SampleCache | None
) -> tuple[list[Metric], SampleCache | None]:
    out: list[Metric] = []
    out.append(InfoMetricFamily("shyped_build", "shyped version", {"version": shyped.__version__}))
    out.append(
        GaugeMetricFamily(
            "shyped_metrics_published_timestamp_seconds",
            "When the daemon published the state this scrape shows (0: not yet)",
            value=snap.published_at,
        )
    )

    out.append(
        GaugeMetricFamily(
            "shyped_vetoes_pending",
            "Domain vetoes that failed and are retried until done or the domain is gone",
            value=snap.vetoes_pending,
        )
    )
    out.append(
        CounterMetricFamily(
            "shyped_veto_failures",
            "Failed attempts to carry out a domain veto (destroy/pause)",
            value=snap.veto_failures,
        )
    )

    dec = CounterMetricFamily(
        "shyped_decisions",
        "Policy decisions by hook, decision (permit/deny) and the rule that decided (reason)",
        labels=["hook", "decision", "reason"],
    )
    for hook, verdict, rule, n in snap.decisions:
        dec.add_metric([hook, verdict, rule], n)
    out.append(dec)

    lat = HistogramMetricFamily(
        "shyped_decision_latency_seconds",
        "Time from the question to the decision, by hook",
        labels=["hook"],
    )
    for h in snap.latency:
        acc = 0
        buckets: list[tuple[str, float]] = []
        for bound, c in zip((*LATENCY_BUCKETS, math.inf), h.counts, strict=True):
            acc += c
            buckets.append((floatToGoString(bound), acc))  # type: ignore[no-untyped-call]
        lat.add_metric([h.hook], buckets, h.total)
    out.append(lat)

    if snap.policy is not None:
        p = snap.policy
        out.append(
            InfoMetricFamily(
                "shyped_policy",
                "The active policy",
                {"name": p.name, "version": p.version, "sha256": p.sha256},
            )
        )
        out.append(
            GaugeMetricFamily(
                "shyped_policy_loaded_timestamp_seconds",
                "When the active policy was loaded",
                value=p.loaded_at,
            )
        )
    if snap.mode is not None:
        mode = GaugeMetricFamily(
            "shyped_enforcement_mode",
            "1 for the current enforcement mode",
            labels=["mode"],
        )
        for m in Mode:
            mode.add_metric([m.value], 1.0 if m.value == snap.mode else 0.0)
        out.append(mode)
    if snap.xenstore_up is not None:
        out.append(
            GaugeMetricFamily(
                "shyped_xenstore_up",
                "1 while connected to xenstored with every watch registered",
                value=1.0 if snap.xenstore_up else 0.0,
            )
        )
        out.append(
            CounterMetricFamily(
                "shyped_xenstore_reconnects",
                "Successful reconnections to xenstored",
                value=snap.xenstore_reconnects,
            )
        )
    ev = CounterMetricFamily(
        "shyped_watch_events", "Typed xenstore watch events by kind", labels=["kind"]
    )
    for kind, n in snap.watch_events:
        ev.add_metric([kind], n)
    out.append(ev)

    new_cache = None
    if snap.host is not None:
        host_fams, new_cache = _host_families(snap, cache)
        out.extend(host_fams)
    if snap.quotas:
        limit = GaugeMetricFamily(
            "shyped_quota_limit",
            "Quota limit per VM label (memory in bytes; per domain except domains)",
            labels=["label", "quota"],
        )
        used = GaugeMetricFamily(
            "shyped_quota_used",
            "Quota use per VM label: running domains, else the highest use of one domain",
            labels=["label", "quota"],
        )
        for row in snap.quotas:
            used.add_metric([row.label, row.kind.metric], row.metric_used)
            if row.metric_limit is not None:
                limit.add_metric([row.label, row.kind.metric], row.metric_limit)
        out.extend((limit, used))
    return out, new_cache


#: The per-domain families, in the order `_domain_samples` fills them:
#: (name, type, help, extra labels).
_DOMAIN_FAMILIES: Final = (
    ("shyped_domain", "info", "A domain the daemon knows, with its state", ()),
    ("shyped_domain_memory_target_bytes", "gauge", "memory/target (dom0-written)", ()),
    ("shyped_domain_memory_max_bytes", "gauge", "memory/static-max (dom0-written)", ()),
    ("shyped_domain_vcpus", "gauge", "vCPUs the domain was built with (cpu/<n>)", ()),
    ("shyped_domain_vcpus_online", "gauge", "vCPUs marked online (cpu/<n>)", ()),
    (
        "shyped_domain_devices",
        "gauge",
        "Devices the domain is the frontend of, by kind",
        ("kind",),
    ),
    (
        "shyped_domain_backend_devices",
        "gauge",
        "Devices the domain serves as backend, by kind",
        ("kind",),
    ),
    (
        "shyped_domain_event_channels",
        "gauge",
        "Event channel ports the domain published, by device kind (guest-written: a count)",
        ("kind",),
    ),
    (
        "shyped_domain_grant_refs",
        "gauge",
        "Grant references the domain published, by device kind (guest-written: a count)",
        ("kind",),
    ),
    ("shyped_domain_vchans", "gauge", "vchan rendezvous by the domain's role", ("role",)),
    (
        "shyped_domain_garbage_writes",
        "counter",
        "Writes of the domain the parser ignored (malformed or over a bound)",
        (),
    ),
    (
        "shyped_domain_garbage_limit_hits",
        "counter",
        "Ignored writes of the domain that hit a per-domain bound",
        (),
    ),
    (
        "shyped_domain_decisions",
        "counter",
        "Decisions recorded about the domain by hook and decision",
        ("hook", "decision"),
    ),
)
_SAMPLE_NAME: Final = tuple(
    name + {"info": "_info", "counter": "_total"}.get(kind, "")
    for name, kind, _, _ in _DOMAIN_FAMILIES
)

DomainSamples = tuple[tuple[Sample, ...], ...]
#: Per-domain samples of the last scrape, by domid, with the account they were made from.
SampleCache = dict[int, tuple[DomainAccount, DomainSamples]]


def _domain_samples(acc: DomainAccount) -> DomainSamples:
    """One domain's samples for each of `_DOMAIN_FAMILIES` (sharing one label dict)."""
    base = dict(zip(DOMAIN_LABELS, _dom_labels(acc), strict=True))
    n = _SAMPLE_NAME

    def one(i: int, value: float | None) -> tuple[Sample, ...]:
        return () if value is None else (Sample(n[i], base, value),)

    def by(i: int, label: str, pairs: Iterable[tuple[str, int]]) -> tuple[Sample, ...]:
        return tuple(Sample(n[i], {**base, label: k}, v) for k, v in pairs if v)

    return (
        (Sample(n[0], {**base, "state": str(acc.state)}, 1.0),),
        one(1, acc.memory_target_bytes),
        one(2, acc.memory_max_bytes),
        one(3, acc.vcpus),
        one(4, acc.vcpus_online),
        by(5, "kind", acc.devices),
        by(6, "kind", acc.backend_devices),
        by(7, "kind", acc.event_channels),
        by(8, "kind", acc.grant_refs),
        by(9, "role", (("server", acc.vchans_served), ("client", acc.vchans_joined))),
        one(10, acc.garbage_writes),
        one(11, acc.garbage_limit_hits),
        tuple(
            Sample(n[12], {**base, "hook": hook, "decision": verdict}, count)
            for hook, verdict, count in acc.decisions
        ),
    )


def _host_families(
    snap: MetricsSnapshot, cache: SampleCache | None = None
) -> tuple[list[Metric], SampleCache]:
    """The per-host and per-domain families; samples of accounts unchanged since `cache` was
    made are reused (at thousands of domains, allocating fewer objects per scrape keeps the
    garbage collector, which stops every thread, from running full collections)."""
    host = snap.host
    assert host is not None
    fams = [Metric(name, doc, kind) for name, kind, doc, _ in _DOMAIN_FAMILIES]
    new_cache: SampleCache = {}
    counts: dict[tuple[str, str], int] = {}
    for acc in host.domains:
        hit = cache.get(acc.domid) if cache is not None else None
        parts = hit[1] if hit is not None and hit[0] is acc else _domain_samples(acc)
        new_cache[acc.domid] = (acc, parts)
        for fam, part in zip(fams, parts, strict=True):
            fam.samples.extend(part)
        key = (acc.label or "", str(acc.state))
        counts[key] = counts.get(key, 0) + 1
    doms = GaugeMetricFamily(
        "shyped_domains", "Domains by label and state", labels=["label", "state"]
    )
    for (label, state), count in sorted(counts.items()):
        doms.add_metric([label, state], count)
    out: list[Metric] = [
        doms,
        CounterMetricFamily(
            "shyped_unattributed_garbage_writes",
            "Ignored writes no domain can be charged with (/libxl, /vm, invalid paths)",
            value=host.unattributed_garbage_writes,
        ),
        *fams,
    ]
    if snap.cpu is not None:
        cpu = CounterMetricFamily(
            "shyped_domain_cpu_seconds",
            "CPU time the domain has used (xl list)",
            labels=list(DOMAIN_LABELS),
        )
        for c in snap.cpu:
            owner = host.domain(c.domid)
            if owner is not None:
                cpu.add_metric(_dom_labels(owner), c.seconds)
        out.append(cpu)
    return out, new_cache


class MetricsCollector(Collector):
    """A prometheus_client collector over the snapshot `get_snapshot` returns.

    `get_snapshot` must only read a reference (e.g. ``lambda: state.snapshot``): it runs on the
    scrape thread. The families of the last snapshot are kept, so scrapes between two
    publications cost only the text formatting, and so are the per-domain samples, reused for
    every account the next snapshot shares (`shyped.core.accounting.AccountCache` keeps unchanged
    accounts the same objects).
    """

    def __init__(self, get_snapshot: Callable[[], MetricsSnapshot]) -> None:
        self._get = get_snapshot
        self._cache: tuple[MetricsSnapshot, list[Metric]] | None = None
        self._samples: SampleCache | None = None

    def collect(self) -> Iterable[Metric]:
        snap = self._get()
        cache = self._cache
        if cache is not None and cache[0] is snap:
            return cache[1]
        fams, samples = _families(snap, self._samples)
        # Each reference is swapped whole: a concurrent scrape uses either the old or new one.
        self._samples = samples
        self._cache = (snap, fams)
        return fams

    def describe(self) -> Iterable[Metric]:
        return []  # names depend on the snapshot; no collect() at registration


def make_registry(
    get_snapshot: Callable[[], MetricsSnapshot], *, process: bool = True
) -> CollectorRegistry:
    """A registry with the shyped collector (and the process/platform collectors)."""
    from prometheus_client import PlatformCollector, ProcessCollector

    registry = CollectorRegistry(auto_describe=False)
    registry.register(MetricsCollector(get_snapshot))
    if process:
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
    return registry


# ---- CPU time from xl -----------------------------------------------------------------------

_XL_LINE: Final = re.compile(
    r"^(?P<name>.+?)\s+(?P<domid>\d+)\s+(?P<mem>\d+)\s+(?P<vcpus>\d+)\s+"
    r"(?P<state>[-rbpscwSd?]{6})\s+(?P<time>\d+\.\d+)"
    r"(?:\s+(?P<uuid>[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}))?"
)


def parse_xl_list(text: str) -> list[XlDomain]:
    """The domains of ``xl list [-v]`` (``tools/xl/xl_info.c`` ``list_domains``: name padded to
    40, id, MiB, vCPUs, six state letters, CPU seconds with one decimal, with -v the uuid)."""
    out: list[XlDomain] = []
    for line in text.splitlines()[1:]:
        m = _XL_LINE.match(line)
        if m is None:
            continue
        out.append(XlDomain(m["name"].strip(), int(m["domid"]), m["uuid"], float(m["time"])))
    return out


class _Collect(protocol.ProcessProtocol):
    def __init__(self, done: Deferred[tuple[bytes, int]], limit: int) -> None:
        self.done = done
        self.out = bytearray()
        self.limit = limit

    def outReceived(self, data: bytes) -> None:
        if len(self.out) < self.limit:
            self.out += data[: self.limit - len(self.out)]

    def processEnded(self, reason: Failure) -> None:
        code = 0
        exc = reason.value
        if isinstance(exc, twisted_error.ProcessTerminated):
            code = exc.exitCode if exc.exitCode is not None else -1
        self.done.callback((bytes(self.out), code))


class XlCpuProvider:
    """Runs ``xl list -v`` every `interval` seconds as a child process (the reactor only reads
    its pipe) and hands the CPU times to `MetricsState.set_cpu_times`. A missing ``xl``, a
    failing one (no hypervisor) or one slower than `timeout` gives no CPU series."""

    def __init__(
        self,
        reactor: Any,
        state: MetricsState,
        xl: Sequence[str] = ("xl",),
        *,
        interval: float = 15.0,
        timeout: float = 10.0,
        max_output: int = 1 << 20,
    ) -> None:
        self._reactor = reactor
        self._state = state
        self._xl = tuple(xl)
        self._timeout = timeout
        self._max_output = max_output
        self._loop = LoopingCall(self.poll)
        self._loop.clock = reactor
        self._interval = interval
        self.failures = 0

    def available(self) -> bool:
        return bool(self._xl) and shutil.which(self._xl[0]) is not None

    def start(self) -> bool:
        """Start polling; False (and nothing started) when ``xl`` is not installed."""
        if not self.available():
            return False
        self._loop.start(self._interval, now=True)
        return True

    def stop(self) -> None:
        if self._loop.running:
            self._loop.stop()

    def poll(self) -> Deferred[None]:
        """One ``xl list -v``; never fails (a failure clears the CPU series)."""
        exe = shutil.which(self._xl[0]) if self._xl else None
        if exe is None:
            self._state.set_cpu_times(None)
            d: Deferred[None] = Deferred()
            d.callback(None)
            return d
        done: Deferred[tuple[bytes, int]] = Deferred()
        proc = _Collect(done, self._max_output)
        transport = self._reactor.spawnProcess(
            proc,
            exe,
            [self._xl[0], *self._xl[1:], "list", "-v"],
            env={**os.environ, "LC_ALL": "C"},
            childFDs={0: "w", 1: "r", 2: "r"},
        )
        transport.closeStdin()
        killer = self._reactor.callLater(self._timeout, _kill, transport)

        def finished(result: tuple[bytes, int]) -> None:
            if killer.active():
                killer.cancel()
            out, code = result
            if code != 0:
                if self.failures == 0:
                    _log.info("xl list failed (exit {code}): no CPU time series", code=code)
                self.failures += 1
                self._state.set_cpu_times(None)
                return
            self._state.set_cpu_times(parse_xl_list(out.decode("utf-8", "replace")))

        return done.addCallback(finished)


def _kill(transport: Any) -> None:
    with contextlib.suppress(twisted_error.ProcessExitedAlready):
        transport.signalProcess("KILL")


def cpu_by_domid(snap: MetricsSnapshot) -> Mapping[int, float]:
    """The CPU seconds a snapshot holds, by domid (empty without a provider)."""
    return {} if snap.cpu is None else {c.domid: c.seconds for c in snap.cpu}
