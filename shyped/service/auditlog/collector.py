"""Prometheus metrics of an `AuditLog`."""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from twisted.logger import Logger

from shyped.service.auditlog.writer import (
    AuditLog,
)

_log = Logger(namespace="shyped.audit")


class AuditCollector(Collector):
    """Prometheus metrics of an `AuditLog` (register it in the daemon's registry)."""

    def __init__(self, log: AuditLog) -> None:
        self._log = log

    def collect(self) -> Iterable[Metric]:
        s = self._log.stats
        yield GaugeMetricFamily(
            "shyped_audit_healthy",
            "1 while audit records reach stable storage, 0 after a write error",
            value=1 if self._log.healthy else 0,
        )
        yield GaugeMetricFamily(
            "shyped_audit_unavailable",
            "1 while the audit log refuses records (fail-closed): admissions are denied",
            value=0 if self._log.available else 1,
        )
        for name, doc, value in (
            ("records", "audit records written", s.records_written),
            ("write_errors", "failed audit writes (disk full, I/O error)", s.write_errors),
            ("records_refused", "audit records refused while fail-closed", s.refused),
            ("records_lost", "audit records dropped (disk_full_action=ignore)", s.lost),
            ("rotations", "audit log file rotations", s.rotations),
            ("recoveries", "audit log crash recoveries at start", s.recoveries),
        ):
            yield CounterMetricFamily(f"shyped_audit_{name}", doc, value=value)
