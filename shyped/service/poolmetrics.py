"""Pool mode's metric families (docs/pool.md, docs/metrics.md), registered beside the
daemon's own collector when ``[pool]`` and ``[metrics]`` are both on."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector


class PoolCollector(Collector):
    """``shyped_pool_*`` from a `shyped.service.poolstore.PoolStore` at scrape time."""

    def __init__(self, pool: Any) -> None:
        self.pool = pool

    def collect(self) -> Iterable[Metric]:
        st = self.pool.status()
        labels = ["host", "prefix"]
        values = [st["host"], st["prefix"]]
        up = GaugeMetricFamily(
            "shyped_pool_connected",
            "1: watching etcd; 0: etcd unreachable, enforcing the last known (cached) state",
            labels=labels,
        )
        up.add_metric(values, 1.0 if st["state"] == "connected" else 0.0)
        yield up
        rev = GaugeMetricFamily(
            "shyped_pool_revision", "etcd revision of the pool state in force", labels=labels
        )
        rev.add_metric(values, float(st["revision"]))
        yield rev
        refused = GaugeMetricFamily(
            "shyped_pool_refused_entries",
            "label entries in the pool refused as malformed (untrusted input)",
            labels=labels,
        )
        refused.add_metric(values, float(st["refused_entries"]))
        yield refused
        anchors = CounterMetricFamily(
            "shyped_pool_audit_anchors", "audit chain heads written to etcd", labels=labels
        )
        anchors.add_metric(values, float(self.pool.anchors_written))
        yield anchors
