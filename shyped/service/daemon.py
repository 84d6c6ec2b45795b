"""The daemon: xenstore watch -> typed events -> host model -> engine -> enforcer, on one reactor.

Edge code that wires the pure parts together (DESIGN.md §5):

* **Watches** on ``/local/domain``, ``/vm``, ``/libxl``, ``@introduceDomain`` and
  ``@releaseDomain``. Events of one reactor turn form a batch: their values are read with ONE
  ``read_many`` (plus a ``get_perms`` for each path where `shyped.core.events.needs_perms` says so:
  vchan keys and every node a guest could own,
  sent in the same round trip), then fed to the `EventAssembler` at once. One batch is in
  flight at a time, so facts are applied in order; paths that fire again meanwhile are read
  once in the next batch. A batch is fair per guest domain (`shyped.core.fairbatch`): trusted
  paths (``/vm``, ``/libxl``, dom0's tree, the special watches) all and first, then at most a
  budget of each guest's paths; a guest's flood waits for later batches and does not delay
  the decisions about others. Events for the daemon's own label node
  (``/local/domain/<d>/shyped/…``, which only dom0 may write) are dropped without a read.
* **Reconcile** at start, after every reconnect and when a watch overflowed: one snapshot of
  ``/`` (one transaction) through `EventAssembler.reconcile`, i.e. the same event path, so every
  existing domain, device and vchan gets a decision and nothing escapes while the daemon was
  down. Watch batches wait while a reconcile runs and re-read afterwards.
* **Decisions**: every `NeedsDecision` is decided at once (pure `Engine`), recorded in the host
  model (which releases the questions waiting on it), logged as one line, handed to the
  decision listeners, then to the `Enforcer` (which waits for Deferreds the listeners return,
  e.g. an audit record, before a veto).
* **Policy reload** (`Daemon.reload_policy`, SIGHUP): load, `check_update` against the running
  system, switch only if allowed (then every question is asked again), else keep the old
  policy and log every reason. **Mode switch** (`Daemon.set_mode`): to enforcing asks every
  question again so past permissive denials are carried out.

Modules: `shyped.service.policyload` (what the daemon starts with), `shyped.service.eventpath`
(`DaemonCore`: the state, watch batches and reconcile, decisions and enforcement, the audit
trail), `shyped.service.policylabels` (`PolicyAndLabels`: mode, relabels, policy reload) and
this one (`Daemon`: lifecycle, listeners, status), each class building on the one before.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import time
from typing import TYPE_CHECKING, Any

import attrs
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from shyped.core import quota as quota_mod
from shyped.core.accounting import account_host
from shyped.core.audit import Kind as AuditKind
from shyped.core.labelstore import LabelStore
from shyped.service.config import Config
from shyped.service.deadlines import fired_within
from shyped.service.enforcer import EnforcerStats
from shyped.service.eventpath import (
    GUEST_REPEAT_BURST,
    GUEST_REPEAT_INTERVAL,
    WATCHES,
    Listener,
    _pid,
)
from shyped.service.flaskdaemon import FlaskCoupling, FlaskStartError
from shyped.service.flaskxen import FlaskXen, make_flask
from shyped.service.metrics import PeriodicPublisher
from shyped.service.policylabels import (
    PolicyAndLabels,
    ReloadResult,
)
from shyped.service.policyload import (
    LoadedPolicy,
    StartupError,
    load_policy,
    load_startup,
    make_actuator,
)
from shyped.service.poolstore import PoolStore
from shyped.service.watchbatch import BATCH_ROUNDS
from shyped.xenstore import (
    ConnectionLost,
)

if TYPE_CHECKING:
    from shyped.service.attestation import Attestation

_log = Logger(namespace="shyped.daemon")

#: Seconds a stop waits for the watch batch or reconcile in flight to end before it closes
#: the connection under it (its reads are answered in milliseconds unless xenstored hangs).
STOP_GRACE = 5.0


@attrs.frozen
class DaemonStatus:
    """A snapshot of the daemon for the control socket and metrics."""

    mode: str
    policy_name: str
    policy_version: str
    policy_sha256: str
    policy_path: str
    connected: bool
    domains: dict[str, int]
    devices: int
    vchans: int
    decisions: dict[str, int]
    vetoes: int
    reconciles: int
    batches: int
    own_events: int
    running_labels: dict[str, int]
    enforcer: EnforcerStats
    uptime: float
    #: label -> quota -> {limit, used, domid, exceeded} (`shyped.core.quota.quota_table_dict`)
    quotas: dict[str, dict[str, dict[str, Any]]] = attrs.field(factory=dict)
    #: the audit trail's state ("ok", "unavailable", "degraded"), None without one
    audit: str | None = None
    #: domain vetoes that failed and are retried (`pending_vetoes`)
    vetoes_pending: tuple[dict[str, Any], ...] = ()
    #: Xen's FLASK: mode, the binary policy shyped loaded, denials read (`FlaskXen.status`)
    flask: dict[str, Any] = attrs.field(factory=dict)
    #: pool mode's store (`shyped.service.poolstore.PoolStore.status`), None on a single host
    pool: dict[str, Any] | None = None
    #: the label store: path, reloads that kept the old one, and why the last did (None: ok)
    label_store: dict[str, Any] = attrs.field(factory=dict)


# ------------------------------------------------------------------------------- the daemon


class Daemon(PolicyAndLabels):
    """One shyped instance. Every method runs on the reactor thread."""

    #: pool mode's store (`shyped.service.poolstore.PoolStore`), set by whoever starts it
    pool: PoolStore | None = None
    #: TPM measurements and quotes (`shyped.service.attestation`), set like `pool`
    attestation: Attestation | None = None

    def __init__(
        self,
        config: Config,
        policy: LoadedPolicy,
        labels: LabelStore,
        *,
        flask: FlaskXen | None = None,
        **kw: Any,
    ) -> None:
        super().__init__(config, policy, labels, **kw)
        self.gateway.close_at_shutdown = False  # `stop` closes it, once its reads are answered
        #: Xen's FLASK (`shyped.service.flaskdaemon`); absent on Debian's Xen and the sandbox.
        self.flask: FlaskCoupling | None = FlaskCoupling(
            self, flask or make_flask(config, self.reactor)
        )

    async def start(self) -> None:
        """Watch, connect, publish dom0's label and decide everything that exists."""
        if self.audit is not None:
            try:
                self.audit.start()
            except Exception as e:
                raise StartupError(f"audit log: {e}") from None
        try:
            if self.flask is not None:
                await self.flask.start(self.loaded.policy)
        except FlaskStartError as e:
            raise StartupError(str(e)) from None
        if self.metrics is not None:
            self.metrics.set_policy(self.loaded.policy, self.loaded.sha256, time.time())
            self.metrics.set_mode(self.mode)
            self.metrics.set_xenstore(False, 0)
            self._publisher = PeriodicPublisher(self.reactor, self.metrics, lambda: self.host)
        for path, token in WATCHES:
            await self.gateway.watch(path, token, self._on_event, self._on_overflow)
        try:
            await self.gateway.connect()
        except ConnectionLost as e:
            raise StartupError(
                f"cannot reach xenstored at {self.gateway.config.socket_path}: {e}"
            ) from None
        self._running = True
        _log.info(
            "shyped started: policy {name} {version} ({fmt}, sha256 {sha}), mode {mode}",
            name=self.loaded.policy.name,
            version=str(self.loaded.policy.version),
            fmt=self.loaded.format,
            sha=self.loaded.sha256[:16],
            mode=self.mode.value,
        )
        self._audit_event(
            AuditKind.DAEMON_START,
            policy=f"{self.loaded.policy.name} {self.loaded.policy.version}",
            policy_sha256=self.loaded.sha256,
            mode=self.mode.value,
            pid=_pid(),
        )
        if self.metrics is not None:
            self.metrics.set_xenstore(True, self._reconnects)
        if self._publisher is not None:
            self._publisher.start()
        self._repeat_flush.start(GUEST_REPEAT_INTERVAL, now=False)
        self._publish_dom0_label()
        await self.reconcile("start")

    def stop(self) -> Deferred[None]:
        """Stop in order: no new watch batch or reconcile starts and the one running ends
        (up to `STOP_GRACE` seconds), actions in flight are abandoned (a device cut waiting
        for its backend, a veto's retries: the next start's reconcile decides them again),
        the audit trail ends with a ``daemon-stop`` record naming the chain head and is
        closed, then the xenstore connection. One log line says what was abandoned."""
        self._running = False
        if self.flask is not None:
            self.flask.stop()
        if self._publisher is not None:
            self._publisher.stop()
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        quiet = await fired_within(self.reactor, self.quiesce(), STOP_GRACE)
        abandoned = self.enforcer.stop()
        if self._repeat_flush.running:
            self._repeat_flush.stop()
            self._flush_repeats()
        audit = self.audit
        if audit is not None and audit.log.log_id:
            # The head it names is filled in when the writer seals it: records of this tick
            # (or still with the writer thread) come before it and are counted.
            done = self._audit_event_as(
                AuditKind.DAEMON_STOP,
                {"decisions": sum(self._decisions.values()), "abandoned": abandoned},
                at_head=True,
            )
            if done is not None:
                with contextlib.suppress(Exception):
                    await done
            await audit.stop()
        await self.gateway.close()
        _log.info(
            "shyped stopped: {n} action(s) in flight abandoned{batch}",
            n=abandoned,
            batch="" if quiet else f"; a watch batch still reading after {STOP_GRACE:g} s cut off",
        )

    def add_listener(self, listener: Listener) -> None:
        self.listeners.append(listener)

    def remove_listener(self, listener: Listener) -> None:
        self.listeners.remove(listener)

    def quota_table(self) -> tuple[quota_mod.QuotaUsage, ...]:
        """The quota usage table of the running domains (``shypectl status``), with the
        run-time quotas' rows once the hypervisor's metering has given a sample."""
        runtime = None if self.metrics is None else self.metrics.label_use
        return quota_mod.quota_table(self.loaded.policy, account_host(self.host), runtime=runtime)

    def label_store_status(self) -> dict[str, Any]:
        """The label store for ``status``: `path`, `reload_failures` (reloads that found it
        unusable and kept the one in use), `error` (why the last reload did; None: ok)."""
        return {
            "path": str(self.config.labels),
            "reload_failures": self.label_store_reload_failures,
            "error": self.label_store_error,
        }

    def publish_metrics(self) -> None:
        """Publish a metrics snapshot now (the periodic publisher does it every second)."""
        if self.metrics is not None:
            self.metrics.publish(self.host)

    def status(self) -> DaemonStatus:
        states: dict[str, int] = {}
        for dom in self.host.domains():
            states[dom.state.value] = states.get(dom.state.value, 0) + 1
        p = self.loaded.policy
        return DaemonStatus(
            mode=self.mode.value,
            policy_name=p.name,
            policy_version=str(p.version),
            policy_sha256=self.loaded.sha256,
            policy_path=str(self.loaded.path),
            connected=self.gateway.connected,
            domains=states,
            devices=len(self.host.devices()),
            vchans=len(self.host.vchans()),
            decisions=dict(self._decisions),
            vetoes=self._vetoes,
            reconciles=self._reconciles,
            batches=self._batches,
            own_events=self._own_events,
            running_labels=dict(self.engine.running.running_labels()),
            enforcer=attrs.evolve(self.enforcer.stats, by_kind=dict(self.enforcer.stats.by_kind)),
            uptime=time.monotonic() - self._started,
            quotas=quota_mod.quota_table_dict(self.quota_table()),
            audit=None if self.audit is None else self.audit.state.value,
            vetoes_pending=self.pending_vetoes(),
            flask={} if self.flask is None else self.flask.flask.status(),
            pool=None if self.pool is None else self.pool.status(),
            label_store=self.label_store_status(),
        )

    def pending_vetoes(self) -> tuple[dict[str, Any], ...]:
        """Domain vetoes that failed and are retried: domid, veto, failed attempts, last
        error, seconds since the first failure and until the next attempt."""
        now = self.reactor.seconds()
        return tuple(
            {
                "domid": p.action.domid,
                "name": dom.name if (dom := self.host.domain(p.action.domid)) else None,
                "veto": p.action.how.value,
                "failures": p.failures,
                "error": p.last_error,
                "failing_for": round(now - p.first_failed, 3),
                "next_attempt_in": round(max(0.0, p.next_at - now), 3),
            }
            for _, p in sorted(self.enforcer.vetoes.pending.items())
        )


__all__ = [
    "BATCH_ROUNDS",
    "GUEST_REPEAT_BURST",
    "GUEST_REPEAT_INTERVAL",
    "WATCHES",
    "Daemon",
    "DaemonStatus",
    "Listener",
    "LoadedPolicy",
    "ReloadResult",
    "StartupError",
    "load_policy",
    "load_startup",
    "make_actuator",
]


def freeze_after_start() -> None:
    """Once the daemon is up: collect the start's garbage, then move every object left (the
    code, the policy, the host model of the domains running at start) to the collector's
    permanent generation (`gc.freeze`), so that later full collections (one may fall in the
    first metrics scrape) do not walk them again. Objects frozen here that later become
    cyclic garbage stay until exit: a bounded amount, what existed at start. Then the C
    allocator is asked to give the free memory of its heaps back to the kernel (glibc's
    ``malloc_trim``; elsewhere nothing happens): the start's large transient buffers."""
    gc.collect()
    gc.freeze()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).malloc_trim(0)  # the process's own symbols: libc's
