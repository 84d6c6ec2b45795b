"""The metrics collector (scrape thread): a `MetricsSnapshot` turned into Prometheus families.

Shape (docs/metrics.md, "Series"): a domain's identity (``domain`` name, ``uuid``, ``label``,
``state``) is on ``shyped_domain_info`` only; every other per-domain series is keyed by
``domid`` (plus its own dimension: ``kind``, ``vif``, …), to be joined in PromQL::

    shyped_domain_memory_max_bytes * on(domid) group_left(domain, label) shyped_domain_info

One unit per metric: each quota has its own pair of families (memory in bytes).

The per-domain values are made once as `Rows` (pure data: labels and a value per sample) by
`shyped.service.metricsrows`; `MetricsCollector` turns them into prometheus_client
families (the registry path: ``generate_latest``, ``name[]`` filtered scrapes, tests), and
`shyped.service.metricstext` renders the same rows into cached exposition text per domain
(the HTTP endpoint's path). A test holds the two byte for byte equal.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
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
from shyped.core.quota import PER_DOMAIN, QuotaKind
from shyped.service.config import Mode
from shyped.service.metrics import LATENCY_BUCKETS, FlaskMetrics, MetricsSnapshot
from shyped.service.metricsrows import (
    DOMAIN_FAMILIES,
    METERING_FAMILIES,
    Rows,
    domain_rows,
    metering_rows,
    sample_name,
)


def _fmt(value: float) -> str:
    return floatToGoString(value)  # type: ignore[no-any-return, no-untyped-call]


#: Each quota's families (used, limit) and help: one unit per metric.
QUOTA_FAMILIES: Final[dict[QuotaKind, tuple[str, str, str]]] = {
    QuotaKind.DOMAINS: ("shyped_quota_domains_used", "shyped_quota_domains_limit", "domains"),
    QuotaKind.MEMORY: (
        "shyped_quota_memory_used_bytes",
        "shyped_quota_memory_limit_bytes",
        "memory of one domain (static-max, else target), bytes",
    ),
    QuotaKind.VCPUS: ("shyped_quota_vcpus_used", "shyped_quota_vcpus_limit", "vCPUs of one domain"),
    QuotaKind.DEVICES: (
        "shyped_quota_devices_used",
        "shyped_quota_devices_limit",
        "devices of one domain",
    ),
    QuotaKind.VCHANS: (
        "shyped_quota_vchans_used",
        "shyped_quota_vchans_limit",
        "vchans of one domain",
    ),
    QuotaKind.EVENT_CHANNELS: (
        "shyped_quota_event_channels_used",
        "shyped_quota_event_channels_limit",
        "event channel ports one domain published",
    ),
    QuotaKind.GRANT_REFS: (
        "shyped_quota_grant_refs_used",
        "shyped_quota_grant_refs_limit",
        "grant references one domain published",
    ),
    QuotaKind.LABEL_MEMORY: (
        "shyped_quota_label_memory_used_bytes",
        "shyped_quota_label_memory_limit_bytes",
        "memory the label's running domains hold (hypervisor, run-time), bytes",
    ),
    QuotaKind.CPU: (
        "shyped_quota_cpu_used_ratio",
        "shyped_quota_cpu_limit_ratio",
        "CPU of the label's running domains over the window (hypervisor, run-time), CPUs",
    ),
}

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
    "shyped_xen_metering_up",
    "shyped_watch_events_total",
    "shyped_domains",
    "shyped_unattributed_garbage_writes_total",
    *(sample_name(s) for s in DOMAIN_FAMILIES),
    *(sample_name(s) for s in METERING_FAMILIES),
    *(name for used, limit, _ in QUOTA_FAMILIES.values() for name in (limit, used)),
    "shyped_flask_mode",
    "shyped_flask_policy_info",
    "shyped_flask_avc_denials_total",
    "shyped_flask_relabels_total",
)


# ---- the families ---------------------------------------------------------------------------


def head_families(snap: MetricsSnapshot) -> list[Metric]:
    """The families before the per-domain ones (daemon state, decisions, policy)."""
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

    if snap.flask is not None:
        out.extend(_flask_families(snap.flask))

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
            buckets.append((_fmt(bound), acc))
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
            "shyped_enforcement_mode", "1 for the current enforcement mode", labels=["mode"]
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
    if snap.metering_source is not None:
        up = GaugeMetricFamily(
            "shyped_xen_metering_up",
            "1 while the hypervisor metering source answers (0: unavailable, e.g. no Xen)",
            labels=["source"],
        )
        up.add_metric([snap.metering_source], 1.0 if snap.metering_up else 0.0)
        out.append(up)
    ev = CounterMetricFamily(
        "shyped_watch_events", "Typed xenstore watch events by kind", labels=["kind"]
    )
    for kind, n in snap.watch_events:
        ev.add_metric([kind], n)
    out.append(ev)
    if snap.host is not None:
        counts: dict[tuple[str, str], int] = {}
        for a in snap.host.domains:
            k = (a.label or "", str(a.state))
            counts[k] = counts.get(k, 0) + 1
        doms = GaugeMetricFamily(
            "shyped_domains", "Domains by label and state", labels=["label", "state"]
        )
        for (label, state), count in sorted(counts.items()):
            doms.add_metric([label, state], count)
        out.append(doms)
        out.append(
            CounterMetricFamily(
                "shyped_unattributed_garbage_writes",
                "Ignored writes no domain can be charged with (/libxl, /vm, invalid paths)",
                value=snap.host.unattributed_garbage_writes,
            )
        )
    return out


def tail_families(snap: MetricsSnapshot) -> list[Metric]:
    """The families after the per-domain ones (the quota table, per label)."""
    if not snap.quotas:
        return []
    fams: dict[QuotaKind, tuple[GaugeMetricFamily, GaugeMetricFamily]] = {}
    for kind, (used_name, limit_name, what) in QUOTA_FAMILIES.items():
        fams[kind] = (
            GaugeMetricFamily(limit_name, f"Quota limit per VM label: {what}", labels=["label"]),
            GaugeMetricFamily(
                used_name,
                f"Quota use per VM label: {what}"
                + (" (the label's highest)" if kind in PER_DOMAIN else ""),
                labels=["label"],
            ),
        )
    for row in snap.quotas:
        limit, used = fams[row.kind]
        used.add_metric([row.label], row.metric_used)
        if row.metric_limit is not None:
            limit.add_metric([row.label], row.metric_limit)
    return [f for pair in fams.values() for f in pair]


DomainRows = tuple[DomainAccount, Rows]
#: Per-domain rows of the last collection, by domid, with the account they were made from.
RowCache = dict[int, DomainRows]


def domain_families(
    snap: MetricsSnapshot, cache: RowCache | None = None
) -> tuple[list[Metric], RowCache]:
    """The per-domain families; rows of accounts unchanged since `cache` are reused."""
    fams = [Metric(name, doc, kind) for name, kind, doc, _ in DOMAIN_FAMILIES]
    new_cache: RowCache = {}
    names = [sample_name(s) for s in DOMAIN_FAMILIES]
    if snap.host is not None:
        for acc in snap.host.domains:
            hit = cache.get(acc.domid) if cache is not None else None
            rows = hit[1] if hit is not None and hit[0] is acc else domain_rows(acc)
            new_cache[acc.domid] = (acc, rows)
            for fam, name, part in zip(fams, names, rows, strict=True):
                fam.samples.extend(Sample(name, dict(labels), v) for labels, v in part)
    out: list[Metric] = [] if snap.host is None else fams
    if snap.metering is not None and snap.host is not None:
        mfams = [Metric(name, doc, kind) for name, kind, doc, _ in METERING_FAMILIES]
        mnames = [sample_name(s) for s in METERING_FAMILIES]
        for m in snap.metering:
            for fam, name, part in zip(mfams, mnames, metering_rows(m), strict=True):
                fam.samples.extend(Sample(name, dict(labels), v) for labels, v in part)
        out.extend(mfams)
    return out, new_cache


def families(snap: MetricsSnapshot, cache: RowCache | None = None) -> list[Metric]:
    """The metric families of one snapshot (pure; see `MetricsCollector` for the caches)."""
    return [*head_families(snap), *domain_families(snap, cache)[0], *tail_families(snap)]


def _flask_families(flask: FlaskMetrics) -> list[Metric]:
    """Xen's FLASK (docs/metrics.md): its mode, the policy shyped loaded, AVC denials."""
    mode = GaugeMetricFamily(
        "shyped_flask_mode", "Xen's FLASK as detected at start (1 for the current mode)",
        labels=["mode"],
    )  # fmt: skip
    for m in ("enforcing", "permissive", "absent"):
        mode.add_metric([m], 1.0 if flask.mode == m else 0.0)
    out: list[Metric] = [mode]
    if flask.policy_sha256 is not None:
        out.append(
            InfoMetricFamily(
                "shyped_flask_policy",
                "The binary FLASK policy shyped loaded into Xen",
                {"sha256": flask.policy_sha256},
            )
        )
    avc = CounterMetricFamily(
        "shyped_flask_avc_denials",
        "AVC denials read from Xen's console ring, by FLASK object class",
        labels=["tclass"],
    )
    for tclass, n in flask.denials:
        avc.add_metric([tclass], n)
    out.append(avc)
    out.append(
        CounterMetricFamily(
            "shyped_flask_relabels",
            "Domains shyped relabelled in Xen (from unlabelled)",
            value=flask.relabels,
        )
    )
    return out


class MetricsCollector(Collector):
    """A prometheus_client collector over the snapshot `get_snapshot` returns.

    `get_snapshot` must only read a reference (e.g. ``lambda: state.snapshot``): it runs on the
    scrape thread. The families of the last snapshot are kept, and so are the per-domain rows,
    reused for every account the next snapshot shares (`shyped.core.accounting.AccountCache`
    keeps unchanged accounts the same objects).
    """

    def __init__(self, get_snapshot: Callable[[], MetricsSnapshot]) -> None:
        self.get_snapshot = get_snapshot
        self._cache: tuple[MetricsSnapshot, list[Metric]] | None = None
        self._rows: RowCache | None = None

    def collect(self) -> Iterable[Metric]:
        snap = self.get_snapshot()
        cache = self._cache
        if cache is not None and cache[0] is snap:
            return cache[1]
        per_domain, rows = domain_families(snap, self._rows)
        fams = [*head_families(snap), *per_domain, *tail_families(snap)]
        # Each reference is swapped whole: a concurrent scrape uses either the old or new one.
        self._rows = rows
        self._cache = (snap, fams)
        return fams

    def describe(self) -> Iterable[Metric]:
        return []  # names depend on the snapshot; no collect() at registration


class MetricsRegistry(CollectorRegistry):
    """A prometheus_client registry that knows its `MetricsCollector` (registered first) and
    the order of the others, so `shyped.service.metricstext` can serve the former from its
    cache and the rest through prometheus_client's encoders."""

    def __init__(self, get_snapshot: Callable[[], MetricsSnapshot]) -> None:
        # collectors that declare no names up front (ours) still answer name[] filters
        super().__init__(auto_describe=False, support_collectors_without_names=True)
        self._order: list[Collector] = []
        self.shyped = MetricsCollector(get_snapshot)
        self.register(self.shyped)

    def register(self, collector: Collector) -> None:
        super().register(collector)
        self._order = [*self._order, collector]

    def unregister(self, collector: Collector) -> None:
        super().unregister(collector)
        self._order = [c for c in self._order if c is not collector]

    def others(self) -> Collector:
        """A collector over every registered collector but the shyped one, in order."""
        return _Chain([c for c in self._order if c is not self.shyped])


class _Chain(Collector):
    def __init__(self, collectors: list[Collector]) -> None:
        self._collectors = collectors

    def collect(self) -> Iterable[Metric]:
        for c in self._collectors:
            yield from c.collect()


def make_registry(
    get_snapshot: Callable[[], MetricsSnapshot], *, process: bool = True
) -> MetricsRegistry:
    """A registry with the shyped collector (and the process/platform collectors)."""
    from prometheus_client import PlatformCollector, ProcessCollector

    registry = MetricsRegistry(get_snapshot)
    if process:
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
    return registry
