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
decision's ``reason`` label is its *rule*, never the free-text reason. A domain's identity
(``domain`` name, ``uuid``, ``label``) is on ``shyped_domain_info`` only; the other per-domain
series carry ``domid`` (to join on) and disappear with the domain. The metric list is in
``docs/metrics.md`` and `shyped.service.metricsfamilies.METRIC_NAMES`.

What Xen measures per domain (CPU, vCPU, memory in use, vif and vbd counters: a
`shyped.core.metering.MeterSample`) comes from an optional provider polling off the reactor:
`shyped.service.xenstat.XenstatProvider` (libxenstat, as xentop) or, for CPU time only,
`shyped.service.xlcpu.XlCpuProvider` (``xl list -v``). Without a hypervisor, as on the sandbox,
there is no ``shyped_xen_*`` per-domain series at all, and ``shyped_xen_metering_up`` says 0.
"""

from __future__ import annotations

import bisect
import math
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Final

import attrs
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from shyped.core.accounting import AccountCache, HostAccount
from shyped.core.events import Event
from shyped.core.host import HostModel
from shyped.core.metering import NS, DomainMeter, LabelUse, MeterSample, match
from shyped.core.quota import QuotaUsage, quota_table
from shyped.policy.decisions import Decision
from shyped.policy.model import Policy
from shyped.service.config import Mode

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
    #: What Xen measured of the model's domains (`shyped.core.metering.match`); None: no
    #: metering provider, or it is unavailable or failing (no per-domain series at all).
    metering: tuple[DomainMeter, ...] | None = None
    #: The metering provider configured (``xenstat``, ``xl``) and whether its last poll
    #: worked; None: none configured.
    metering_source: str | None = None
    metering_up: bool = False
    #: Domain vetoes that failed and are being retried; failed veto attempts so far.
    vetoes_pending: int = 0
    veto_failures: int = 0
    #: None: the daemon did not detect Xen's FLASK yet.
    flask: FlaskMetrics | None = None


@attrs.frozen
class FlaskMetrics:
    """Xen's FLASK as the daemon sees it (`shyped.service.flaskxen`)."""

    mode: str  #: enforcing, permissive, absent
    policy_sha256: str | None = None  #: the binary policy shyped loaded into Xen
    #: AVC denials read from Xen's console ring, by object class (closed set), sorted
    denials: tuple[tuple[str, int], ...] = ()
    relabels: int = 0


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
        self._meter: MeterSample | None = None
        self._meter_source: str | None = None
        self._meter_up = False
        self._meter_listeners: list[Callable[[MeterSample], None]] = []
        self._label_use: Mapping[str, LabelUse] | None = None
        self._vetoes: tuple[int, int] = (0, 0)
        self._flask: FlaskMetrics | None = None
        self._snapshot: MetricsSnapshot = EMPTY_SNAPSHOT
        self._accounts = AccountCache()
        self.dirty = True

    @property
    def snapshot(self) -> MetricsSnapshot:
        """The last published snapshot (any thread may read it)."""
        return self._snapshot

    def observe_decision(
        self, decision: Decision, latency_s: float | None = None, *, hook: str | None = None
    ) -> None:
        """Count a decision (hook, permit/deny, rule) and, if given, how long it took.

        `hook`: the hook of the question (``HOOK_OF_KIND[need.kind]``), as the per-domain
        decision counter names it; default: the hook of the check that decided."""
        key = (hook or str(decision.hook), decision.verdict, str(decision.rule))
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

    def set_flask(self, flask: FlaskMetrics) -> None:
        """Xen's FLASK: mode, loaded policy, denials read, relabels."""
        if flask != self._flask:
            self._flask = flask
            self.dirty = True

    def set_metering(self, source: str, sample: MeterSample | None) -> None:
        """What the metering provider `source` last read (None: not available or failed)."""
        self._meter_source = source
        self._meter = sample
        self._meter_up = sample is not None
        self.dirty = True
        if sample is not None:
            for listener in list(self._meter_listeners):
                try:
                    listener(sample)
                except Exception:
                    _log.failure("metering listener {l!r} raised", l=listener)

    def add_meter_listener(self, listener: Callable[[MeterSample], None]) -> None:
        """Call `listener` with every metering sample (the run-time quotas)."""
        self._meter_listeners.append(listener)

    @property
    def label_use(self) -> Mapping[str, LabelUse] | None:
        """The last per-label use of the run-time quotas (None before the first sample)."""
        return self._label_use

    def set_label_use(self, use: Mapping[str, LabelUse] | None) -> None:
        """Per-label use the run-time quotas computed (the quota table's run-time rows)."""
        self._label_use = use
        self.dirty = True

    def set_cpu_times(self, domains: Sequence[XlDomain] | None) -> None:
        """CPU times from ``xl list`` (None: not available), as a metering sample."""
        sample = None
        if domains is not None:
            sample = MeterSample(
                time.monotonic(),
                "xl",
                tuple(
                    DomainMeter(d.domid, d.name, d.uuid, round(d.cpu_seconds * NS)) for d in domains
                ),
            )
        self.set_metering("xl", sample)

    @property
    def meter_sample(self) -> MeterSample | None:
        """The last sample (reactor thread), for the run-time quotas."""
        return self._meter

    def publish(self, model: HostModel | None) -> MetricsSnapshot:
        """Build a frozen snapshot of everything (and the model's domains) and swap it in."""
        host = self._accounts.host(model) if model is not None else None
        quotas: tuple[QuotaUsage, ...] = ()
        if host is not None and self._policy is not None:
            quotas = quota_table(self._policy, host, runtime=self._label_use)
        metering = None
        if self._meter is not None and host is not None:
            metering = match(self._meter, host)
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
            metering=metering,
            metering_source=self._meter_source,
            metering_up=self._meter_up,
            vetoes_pending=self._vetoes[0],
            veto_failures=self._vetoes[1],
            flask=self._flask,
        )
        self._snapshot = snap  # the one atomic swap the collector sees
        self.dirty = False
        return snap


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
