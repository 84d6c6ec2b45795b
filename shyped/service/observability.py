"""Building the daemon's audit trail and metrics endpoint from its configuration (edge code).

`build_audit` makes the `AsyncAuditLog` the `Daemon` records into (``[audit]``);
`build_user_avc` the mirror of denials to the Linux audit subsystem (``[log] user_avc``); `Metrics`
holds the `MetricsState` the daemon feeds and serves it on ``[metrics] address:port``
(loopback only, behind the access control and budgets of `shyped.service.metricsweb`) with the
audit collector and, on a real host (``actuator.kind = "xl"``), what Xen measures per domain
through libxenstat (`shyped.service.xenstat`), or CPU time only from ``xl list`` without it.
`shyped.cli.main` wires them; the daemon tests do the same.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import IListeningPort
from twisted.logger import Logger

from shyped.service.auditlog import AsyncAuditLog, AuditCollector, AuditLog
from shyped.service.config import Config
from shyped.service.linuxaudit import UserAvcMirror
from shyped.service.metrics import MetricsState
from shyped.service.metricsfamilies import make_registry
from shyped.service.metricsweb import (
    ConnectionCollector,
    MetricsAccess,
    load_access,
    nofile_limit,
    start_metrics_server,
)
from shyped.service.xenstat import XenstatProvider
from shyped.service.xlcpu import XlCpuProvider

_log = Logger(namespace="shyped.observability")


def build_user_avc(config: Config) -> UserAvcMirror | None:
    """The USER_AVC mirror of denials ``[log] user_avc`` asks for (None when off); the caller
    adds it to the daemon's decision listeners and closes it at shutdown."""
    return UserAvcMirror() if config.log.user_avc else None


def build_audit(config: Config, reactor: Any, *, durable: bool = True) -> AsyncAuditLog | None:
    """The audit trail ``[audit]`` asks for (None when off); the daemon starts and stops it.
    `durable=False` skips the fsyncs (benchmarks only)."""
    if not config.audit.enabled:
        return None
    return AsyncAuditLog(AuditLog(config.audit.settings(), durable=durable), reactor)


class Metrics:
    """The metrics state the daemon feeds and, once `start`ed, its HTTP endpoint."""

    def __init__(
        self,
        config: Config,
        reactor: Any,
        audit: AsyncAuditLog | None = None,
        access: MetricsAccess | None = None,
    ) -> None:
        self.config = config
        self.access = access if access is not None else load_access(config.metrics)
        self.reactor = reactor
        self.state = MetricsState()
        self.registry = make_registry(lambda: self.state.snapshot)
        if audit is not None:
            self.registry.register(AuditCollector(audit.log))
        self.port: Any = None  # IListeningPort
        self.cpu: XlCpuProvider | None = None
        self.xenstat: XenstatProvider | None = None

    def start(self) -> IListeningPort:
        """Listen (raises ValueError for a non-loopback address, or the bind error)."""
        port: IListeningPort = start_metrics_server(
            self.reactor, self.config.metrics, self.registry, self.access
        )
        self.port = port
        listening: Any = port  # a tcp.Port: its factory is the BudgetedFactory
        host = listening.getHost()
        scheme = "http" if self.access.tls is None else "https"
        _log.info(
            "metrics endpoint on {scheme}://{host}:{port}/metrics ({auth})",
            scheme=scheme,
            host=getattr(host, "host", "?"),
            port=getattr(host, "port", "?"),
            auth="no authentication" if self.access.unauthenticated else "authentication required",
        )
        self.registry.register(ConnectionCollector(listening.factory))
        room = nofile_limit() - self.config.metrics.fd_reserve
        if room < self.config.metrics.max_connections + 64:
            _log.warn(
                "metrics endpoint: the descriptor limit {limit} less fd_reserve leaves {room} "
                "descriptors: it will refuse connections early (raise LimitNOFILE)",
                limit=nofile_limit(),
                room=room,
            )
        if self.config.actuator.kind == "xl":
            self.xenstat = XenstatProvider(
                self.reactor,
                self.state.set_metering,
                interval=self.config.metrics.metering_interval,
            )
            if not self.xenstat.start():  # logged; then CPU time only, from xl list
                self.cpu = XlCpuProvider(
                    self.reactor,
                    self.state,
                    self.config.actuator.xl,
                    interval=self.config.metrics.metering_interval,
                )
                if not self.cpu.start():
                    _log.info("no CPU time per domain: xl list -v is not available")
        return port

    def stop(self) -> Any:
        if self.cpu is not None:
            self.cpu.stop()
        if self.xenstat is not None:
            self.xenstat.stop()
        if self.port is not None:
            port, self.port = self.port, None
            return port.stopListening()
        return None


def build_metrics(config: Config, reactor: Any, audit: AsyncAuditLog | None) -> Metrics | None:
    """The metrics ``[metrics]`` asks for (None when disabled); not listening yet. Reads the
    credentials files: a `shyped.service.config.ConfigError` says what is wrong with them."""
    if not config.metrics.enabled:
        return None
    return Metrics(config, reactor, audit)
