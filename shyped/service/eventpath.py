"""The daemon's event path: watch batches and reconcile, decisions and enforcement (see
`shyped.service.daemon` for the whole); the records of its decisions, which gate enforcement,
are `shyped.service.eventaudit`'s."""

from __future__ import annotations

import os
import re
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any, Final

import attrs
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from shyped.core.accounting import HOOK_OF_KIND, touched_domains
from shyped.core.actions import (
    LABEL_DIR,
    Action,
    RemoveNode,
    RemoveVchan,
    ResetPerms,
    VetoDomain,
    WriteLabel,
)
from shyped.core.assembler import EventAssembler
from shyped.core.audit import Kind as AuditKind
from shyped.core.engine import Engine, Outcome
from shyped.core.events import ignored_subtree, needs_perms
from shyped.core.fairbatch import FairBatches
from shyped.core.host import HostModel
from shyped.core.hostfacts import DomainReleased, DomainState, NeedsDecision
from shyped.core.labelstore import (
    LabelStore,
    resolve_resource,
)
from shyped.core.repeats import PacedDecisions
from shyped.core.xsparse import MAX_NAME, parse_text
from shyped.policy.decisions import PolicyEngine, Rule, UnknownLabelError
from shyped.service.actuator import ToolstackActuator
from shyped.service.auditlog import AsyncAuditLog
from shyped.service.config import Config, Mode
from shyped.service.enforcer import Enforcer
from shyped.service.eventaudit import GUEST_REPEAT_BURST as GUEST_REPEAT_BURST
from shyped.service.eventaudit import GUEST_REPEAT_INTERVAL as GUEST_REPEAT_INTERVAL
from shyped.service.eventaudit import DecisionRecords
from shyped.service.metrics import MetricsState, PeriodicPublisher
from shyped.service.policyload import (
    LoadedPolicy,
    make_actuator,
)
from shyped.service.runtimequotas import RuntimeQuotaFeed
from shyped.service.vetoretry import VetoAttempt, worth_recording
from shyped.service.watchbatch import BatchReader
from shyped.xenstore import (
    ConnectionLost,
    GatewayConfig,
    XenstoreGateway,
)

_log = Logger(namespace="shyped.daemon")

#: a guest's home, as the gateway names the subtree of an overflowed lane
_GUEST_HOME: Final = re.compile(r"/local/domain/([0-9]{1,5})")


#: (path, token) of every watch the daemon registers.
WATCHES = (
    ("/local/domain", "shyped-local"),
    ("/vm", "shyped-vm"),
    ("/libxl", "shyped-libxl"),
    ("@introduceDomain", "shyped-introduce"),
    ("@releaseDomain", "shyped-release"),
)

#: A decision listener: called on the reactor thread with every outcome; may return a
#: Deferred the enforcer waits for before carrying out the outcome's actions.
Listener = Callable[[Outcome], "Deferred[Any] | None"]


class DaemonCore(DecisionRecords):
    """The daemon's state and its event path: watch batches, reconcile, decisions, enforcement
    and the audit trail. `Daemon` (`shyped.service.daemon`) is the whole; every method runs on
    the reactor thread."""

    def __init__(
        self,
        config: Config,
        policy: LoadedPolicy,
        labels: LabelStore,
        *,
        reactor: Any = None,
        gateway: XenstoreGateway | None = None,
        actuator: ToolstackActuator | None = None,
        audit: AsyncAuditLog | None = None,
        metrics: MetricsState | None = None,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor as global_reactor

            reactor = global_reactor
        self.config = config
        self.reactor = reactor
        self.loaded = policy
        self.gateway = gateway or XenstoreGateway(
            GatewayConfig.from_xenstore_config(config.xenstore), reactor=reactor
        )
        self.gateway.on_reconnected = self._reconnected
        self.gateway.on_connection_lost = self._connection_lost
        self.engine = Engine(
            PolicyEngine(policy.policy),
            labels,
            mode=config.mode,
            domain_veto=config.domain_veto,
            resolve=resolve_resource,
        )
        self.host = HostModel(self.engine.dom0_label())
        self.assembler = EventAssembler()
        self.enforcer = Enforcer(
            self.gateway,
            actuator or make_actuator(config, reactor),
            reactor=reactor,
            close_timeout=config.device_close_timeout,
        )
        self.enforcer.vetoes.wanted = self._veto_wanted
        self.enforcer.vetoes.on_attempt = self._veto_attempt
        self.enforcer.on_changed = self._veto_changed
        #: Decision listeners (audit trail, metrics …); see `Listener`.
        self.listeners: list[Listener] = []
        #: watched paths to read, with the monotonic time their first pending event arrived;
        #: taken fairly per guest domain, trusted paths first (`shyped.core.fairbatch`)
        self._pending = FairBatches()
        self._reader = BatchReader(self.gateway, self.assembler, reactor)
        self._scheduled = False
        self._busy = False
        self._want_reconcile: str | None = None
        self._reconcile_waiters: list[Deferred[None]] = []
        self._idle_waiters: list[Deferred[None]] = []
        #: stopping: no new watch batch or reconcile starts (`quiesce`)
        self._stopping = False
        self._quiet_waiters: list[Deferred[None]] = []
        #: `settled` callers whose barrier found no connection: fired after the reconnect's
        #: reconcile (failed if the daemon stops first)
        self._reconnect_waiters: list[Deferred[None]] = []
        self._decisions = {"permit": 0, "deny": 0}
        self._vetoes = 0
        self._reconciles = 0
        self._batches = 0
        self._own_events = 0
        self._started = time.monotonic()
        self._running = False
        #: The audit trail (records gate enforcing actions) and the metrics, if configured.
        self.audit = audit
        self.metrics = metrics
        #: called with each audit event's kind, audit trail or not
        self.event_observers: list[Callable[[str], None]] = []
        if metrics is not None:  # run-time quotas judge the hypervisor's metering samples
            RuntimeQuotaFeed(self, metrics, config.metrics.cpu_window)
        self._publisher: PeriodicPublisher | None = None
        self._reconnects = 0
        self._unsynced: set[Deferred[Any]] = set()  # decision records not yet durable
        self._repeats = PacedDecisions(burst=GUEST_REPEAT_BURST)
        self._repeat_flush = LoopingCall(self._flush_repeats)
        self._repeat_flush.clock = reactor
        if audit is not None:
            audit.add_listener(self._audit_state)

    @property
    def mode(self) -> Mode:
        return self.engine.mode

    def _veto_wanted(self, action: VetoDomain) -> bool:
        """A pending veto is retried while its domain is still there and denied, enforcing."""
        dom = self.host.domain(action.domid)
        return dom is not None and dom.state is DomainState.DENIED and self.mode is Mode.ENFORCING

    def _veto_attempt(self, attempt: VetoAttempt) -> None:
        if attempt.result == "failed":
            self._count_while_pending(attempt.action.domid)
        if self.metrics is not None:
            self.metrics.set_vetoes(
                len(self.enforcer.vetoes.pending), self.enforcer.vetoes.failures
            )
        if worth_recording(attempt):
            self._audit_event(
                AuditKind.VETO_RETRY, domid=attempt.action.domid, veto=attempt.action.how.value,
                result=attempt.result, failures=attempt.failures, error=attempt.error or None,
                retry_in=None if attempt.retry_in is None else round(attempt.retry_in, 3),
            )  # fmt: skip

    def _count_while_pending(self, domid: int) -> None:
        """A denied domain whose veto failed still runs: it counts in the Chinese Wall set
        (as a permissively admitted one does) until it is gone, so its rivals stay out."""
        dom = self.host.domain(domid)
        if dom is None or dom.label is None or domid in self.engine.counted():
            return
        try:
            self.engine.relabel(domid, dom.label)
        except UnknownLabelError:
            return  # a label that does not resolve has no Chinese Wall types
        _log.warn(
            "domain {domid} ({label}) counts in the Chinese Wall while its veto is pending",
            domid=domid,
            label=dom.label,
        )

    @property
    def ready(self) -> bool:
        """The first reconcile is done: everything that existed at start has been decided."""
        return self._reconciles > 0

    def settled(self) -> Deferred[None]:
        """Fires once everything xenstored reported before the call has been decided and no
        event, reconcile or action is pending (tests, the demo). A device veto waiting for
        its backend to close counts as pending. While xenstored is unreachable it waits for
        the reconnect's reconcile; it fails with the barrier read's error otherwise (e.g.
        `ConnectionLost` once the daemon stops or the gateway is closed)."""
        return Deferred.fromCoroutine(self._settle())

    async def _settle(self) -> None:
        while True:
            before = (self._batches, self._reconciles, self.enforcer.stats.actions)
            # A reply comes after every watch event xenstored queued before it, and the
            # gateway runs event callbacks before completing replies: a barrier. Without a
            # connection there is no barrier: wait for the reconnect's reconcile (it reads
            # everything again) and try again; any other error is the caller's.
            try:
                await self.gateway.read("/")
            except ConnectionLost:
                if self._stopping or not self.gateway.reconnecting:
                    raise
                back: Deferred[None] = Deferred()
                self._reconnect_waiters.append(back)
                await back
                continue
            idle: Deferred[None] = Deferred()
            self._idle_waiters.append(idle)
            self._check_idle()
            await idle
            if before == (self._batches, self._reconciles, self.enforcer.stats.actions):
                return

    def _check_idle(self) -> None:
        if not self._idle_waiters:
            return
        if self._busy or self._pending or self._scheduled or self._want_reconcile:
            return
        if not self.enforcer.idle():
            self.reactor.callLater(0.01, self._check_idle)
            return
        waiters, self._idle_waiters = self._idle_waiters, []
        for d in waiters:
            d.callback(None)

    @staticmethod
    def _own(path: str) -> bool:
        """An event for the daemon's own label node (only dom0 may write there)."""
        if not path.startswith("/local/domain/"):
            return False
        parts = path.split("/", 5)
        return len(parts) > 4 and parts[4] == LABEL_DIR

    def _on_event(self, path: str, _token: str) -> None:
        if self._own(path):
            self._own_events += 1
            self.enforcer.labels.seen(path)
            return
        self.enforcer.touched(path)  # a cut's frontend, checked at once (not batched)
        self._pending.add(path, time.monotonic())
        self._kick()

    def _veto_changed(self, action: Action) -> None:
        """A node veto has run: what the assembler emitted about those nodes no longer holds,
        and a re-grant may hide in a coalesced watch event. Withdraw it and read the nodes
        again, so what is there now is decided afresh (`EventAssembler.withdraw`)."""
        assert isinstance(action, ResetPerms | RemoveVchan | RemoveNode)
        events, again = self.assembler.withdraw(
            action.path, subtree=not isinstance(action, ResetPerms)
        )
        self._process(events, None)
        now = time.monotonic()
        for path in again:
            self._pending.add(path, now)
        if again:
            self._kick()

    def _on_overflow(self, path: str) -> None:
        guest = _GUEST_HOME.fullmatch(path)
        if guest is not None and int(guest.group(1)) != 0:
            # one guest flooded its lane of the gateway's queue: only its tree is read again
            self._pending.drop_guest(int(guest.group(1)), time.monotonic())
            self._kick()
            return
        _log.warn("watch on {path} overflowed: reconciling", path=path)
        self.reconcile("overflow").addErrback(self._ignore_lost)

    def _reconnected(self) -> None:
        self._reconnects += 1
        if self.metrics is not None:
            self.metrics.set_xenstore(True, self._reconnects)
        self._publish_dom0_label()  # a restarted xenstored may have lost it
        d = self.reconcile("reconnect").addErrback(self._ignore_lost)
        waiters, self._reconnect_waiters = self._reconnect_waiters, []

        def wake(_: object) -> None:
            for w in waiters:
                w.callback(None)

        d.addBoth(wake)

    def _connection_lost(self, error: ConnectionLost) -> None:
        _log.warn("lost xenstored ({error}); reconnecting", error=str(error))
        if self.metrics is not None:
            self.metrics.set_xenstore(False, self._reconnects)

    @staticmethod
    def _ignore_lost(failure: Failure) -> None:
        if not isinstance(failure.value, ConnectionLost):
            _log.failure("reconcile failed", failure)

    def _kick(self) -> None:
        if self._scheduled or self._busy:
            return
        self._scheduled = True
        self.reactor.callLater(0, self._step)

    def quiesce(self) -> Deferred[None]:
        """Start no new watch batch or reconcile (the daemon stops); fires once the one
        running, if any, has ended: its reads are answered before the connection closes."""
        self._stopping = True
        waiters, self._reconnect_waiters = self._reconnect_waiters, []
        for w in waiters:
            w.errback(ConnectionLost("the daemon stops"))
        if not self._busy:
            return defer.succeed(None)
        d: Deferred[None] = Deferred()
        self._quiet_waiters.append(d)
        return d

    def _step(self) -> None:
        self._scheduled = False
        if self._busy or self._stopping:
            return
        if self._want_reconcile is not None:
            reason, self._want_reconcile = self._want_reconcile, None
            waiters, self._reconcile_waiters = self._reconcile_waiters, []
            self._busy = True
            d = Deferred.fromCoroutine(self._do_reconcile(reason))

            def finished(result: Failure | None) -> None:
                self._done()
                for w in waiters:
                    if isinstance(result, Failure):
                        w.errback(result)
                    else:
                        w.callback(None)

            d.addBoth(finished)
        elif self._pending:
            self._pending.begin()
            paths, earliest = self._pending.take()
            received = time.monotonic() if earliest is None else earliest
            self._busy = True
            self._batches += 1
            batch = Deferred.fromCoroutine(self._do_batch(paths, received))
            batch.addErrback(self._batch_failed)
            batch.addBoth(lambda _: self._done())
        else:
            self._check_idle()

    def _done(self) -> None:
        self._busy = False
        if self._stopping:
            waiters, self._quiet_waiters = self._quiet_waiters, []
            for w in waiters:
                w.callback(None)
            return
        if self._pending or self._want_reconcile is not None:
            self._kick()
        else:
            self._check_idle()

    def _batch_failed(self, failure: Failure) -> None:
        if isinstance(failure.value, ConnectionLost):
            return  # the reconcile after the reconnect covers it
        _log.failure("watch batch failed; reconciling", failure)
        self._want_reconcile = self._want_reconcile or "batch error"

    async def _do_batch(self, paths: list[str], received: float) -> None:
        """Read the batch (and the rest of its burst) and decide on it
        (`shyped.service.watchbatch`)."""
        for events, when in await self._reader.read(self._pending, paths, received):
            self._process(events, when)

    def reconcile(self, reason: str) -> Deferred[None]:
        """Walk the whole of xenstore through the event path (see the module docstring)."""
        d: Deferred[None] = Deferred()
        self._reconcile_waiters.append(d)
        self._want_reconcile = reason
        self._kick()
        return d

    async def _do_reconcile(self, reason: str) -> None:
        received = time.monotonic()
        # Values and permissions (only where the assembler uses them: vchan keys, nodes a
        # guest could own) in one transaction, pipelined, leaving out the subtrees the
        # assembler ignores (`shyped.xenstore.snapshot`); nothing else of the walk is kept.
        snapshot = await self.gateway.scan("/", ignored_subtree, needs_perms)
        nodes, consistent = snapshot.entries, snapshot.consistent
        self._reconciles += 1
        events = self.assembler.reconcile(nodes, "/")
        count = len(nodes)
        published = published_labels((p, v) for p, v, _ in nodes.sorted_items())
        del snapshot, nodes  # the walk is not needed past this point
        self._audit_event(AuditKind.RECONCILE, reason=reason, nodes=count, events=len(events))
        _log.info(
            "reconcile ({reason}): {nodes} nodes, {events} events{inc}",
            reason=reason,
            nodes=count,
            events=len(events),
            inc="" if consistent else " (inconsistent walk; watches converge)",
        )
        # A running domain keeps the label it was admitted with (its dom0-owned label node),
        # for this reconcile's decisions only: a domid reused later is a new domain.
        self.engine.remember_published(published)
        try:
            self._process(events, received)
        finally:
            self.engine.remember_published({})

    def _process(self, events: Iterable[Any], received: float | None) -> None:
        queue: deque[NeedsDecision] = deque()
        events = list(events)
        if self.metrics is not None:
            self.metrics.observe_events(events)
        for event in events:
            self.enforcer.observe(event)
            for out in self.host.apply(event):
                if isinstance(out, DomainReleased):
                    self._released(out)
                else:
                    queue.append(out)
        self._decide(queue, received)
        self._recheck_quotas(touched_domains(events), received)

    def _recheck_quotas(self, domids: Iterable[int], received: float | None) -> None:
        """Running domains whose account changed (sizes written after admission, rings
        published) are checked against their label's per-domain quotas again."""
        for domid in sorted(domids):
            outcome = self.engine.recheck_quota(domid, self.host)
            if outcome is None:
                continue
            if received is not None:
                outcome = attrs.evolve(outcome, received=received)
            ready = self.host.record_decision(
                outcome.need, False, label=outcome.label, reason=outcome.decision.reason
            )
            self._emit(outcome)
            self._decide(deque(ready), received)

    def _released(self, out: DomainReleased) -> None:
        inst = self.engine.instance_of(out.domid)
        label = self.engine.release(out)
        if inst is not None:
            self._audit_event(
                AuditKind.INSTANCE_RELEASE,
                instance=inst.name,
                domid=out.domid,
                uuid=inst.uuid,
                name=out.name,
            )
        _log.info(
            "domain gone: {name}({domid}{uuid}) {state}{counted}",
            name=out.name or "?",
            domid=out.domid,
            uuid=f", {out.uuid}" if out.uuid else "",
            state=out.state.value,
            counted=f"; released Chinese Wall types of {label!r}" if label else "",
        )

    def _decide(self, queue: deque[NeedsDecision], received: float | None = None) -> None:
        while queue:
            need = queue.popleft()
            if not self.host.is_current(need):
                continue
            if self._audit_refusing():
                outcome = self.engine.refuse(need, self.host, Rule.AUDIT, self._audit_reason())
            elif self._untrusted_identity(need):
                reason = f"{need.identity}: a domain is only admitted under a sound identity"
                outcome = self.engine.refuse(need, self.host, Rule.LABEL, reason)
            else:
                outcome = self.engine.decide(need, self.host)
            if received is not None:
                outcome = attrs.evolve(outcome, received=received)
            ready = self.host.record_decision(
                need, outcome.allowed, label=outcome.label, reason=outcome.decision.reason
            )
            queue.extend(ready)
            self._emit(outcome)

    def _untrusted_identity(self, need: NeedsDecision) -> bool:
        """A new domain whose name does not parse or whose UUID another domain holds is denied
        (docs/operations.md, "Domain identity"); one that already runs keeps its decision."""
        if need.kind != "domain" or not need.identity:
            return False
        dom = self.host.domain(need.domid)
        return dom is not None and dom.state in (DomainState.SEEN, DomainState.DENIED)

    def _emit(self, outcome: Outcome, *, record: bool = True) -> None:
        self._decisions[outcome.decision.verdict] += 1
        if outcome.enforced:
            self._vetoes += 1
        if not self._in_full(outcome):
            record = False  # counted; summarised by _flush_repeats
        elif outcome.allowed:
            _log.info("{line}", line=outcome.log_line())
        else:
            _log.warn("{line}", line=outcome.log_line())
        if self.metrics is not None:
            latency = None if outcome.received is None else time.monotonic() - outcome.received
            hook = str(HOOK_OF_KIND[outcome.kind])  # as the per-domain counter names it
            self.metrics.observe_decision(outcome.decision, latency, hook=hook)
        gates: list[Deferred[Any]] = []
        recorded = self._audit_decision(outcome) if record else None
        if recorded is not None and outcome.mode is Mode.ENFORCING:
            gates.append(recorded)
        for listener in list(self.listeners):
            try:
                result = listener(outcome)
            except Exception:
                _log.failure("decision listener {l!r} raised", l=listener)
                continue
            if isinstance(result, Deferred):
                gates.append(result.addErrback(_listener_failed, listener))
        gate = defer.DeferredList(gates, consumeErrors=True) if gates else None
        self.enforcer.execute(outcome, gate)

    def _publish_dom0_label(self) -> None:
        label = self.engine.label_string(self.engine.dom0_label())
        self.enforcer.execute_action(WriteLabel(0, None, label))

    def _sweep(self, reason: str) -> None:
        """Ask every question again: running domains first, then the rest (see Engine)."""
        self.engine.begin_sweep(self.host)
        needs = self.host.all_needs()

        def order(need: NeedsDecision) -> int:
            if need.kind != "domain":
                return 2
            dom = self.host.domain(need.domid)
            running = dom is not None and dom.state in (DomainState.ADMITTED, DomainState.PAUSED)
            return 0 if running else 1

        needs.sort(key=order)
        _log.info("re-deciding {n} questions ({reason})", n=len(needs), reason=reason)
        try:
            self._decide(deque(needs))
        finally:
            self.engine.end_sweep()
        self._check_idle()


def published_labels(nodes: Iterable[tuple[str, bytes]]) -> dict[int, str]:
    """``/local/domain/<d>/shyped/label`` values among `nodes` (path, value), by domid
    (d != 0). The directory is dom0's (``n0,r<d>``, under the dom0-owned home): a guest
    cannot write it."""
    out: dict[int, str] = {}
    for path, value in nodes:
        if not path.endswith(_LABEL_SUFFIX):
            continue
        comps = path.split("/")
        if (
            len(comps) != 6
            or comps[1:3] != ["local", "domain"]
            or comps[4:] != [LABEL_DIR, "label"]
        ):
            continue
        if not comps[3].isdigit() or comps[3] == "0":
            continue
        text = parse_text(value, MAX_NAME)
        if text is not None:
            out[int(comps[3])] = text
    return out


_LABEL_SUFFIX: Final = f"/{LABEL_DIR}/label"


def _pid() -> int:
    return os.getpid()


def _listener_failed(failure: Failure, listener: Listener) -> None:
    _log.failure("decision listener {l!r} failed", failure, l=listener)
