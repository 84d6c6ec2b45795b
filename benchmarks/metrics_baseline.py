"""The metrics collector as it was before metering v2 (issue 16), kept for `bench_metrics.py`
only: the baseline each run measures the current endpoint against. Every per-domain series
repeats ``domain``, ``domid``, ``uuid`` and ``label``; prometheus_client formats every sample
of every scrape. Not part of the package, not to be used by the daemon."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Final

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

import shyped
from shyped.core.accounting import DomainAccount
from shyped.service.config import Mode
from shyped.service.metrics import LATENCY_BUCKETS, MetricsSnapshot

#: The labels of every per-domain series (then).
DOMAIN_LABELS: Final = ("domain", "domid", "uuid", "label")

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
    if getattr(snap, "cpu", None) is not None:  # xl CPU times (none in the benchmark)
        cpu = CounterMetricFamily(
            "shyped_domain_cpu_seconds",
            "CPU time the domain has used (xl list)",
            labels=list(DOMAIN_LABELS),
        )
        for c in snap.cpu:  # type: ignore[attr-defined]
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
