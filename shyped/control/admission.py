"""The control backend's base: its view of the daemon (helpers), the admissions a client
waits for (`wait_admission`), and the audit records of control changes.

`shyped.control.policyops.PolicyOps` adds the policy ops on it;
`shyped.control.daemon_backend.DaemonControlBackend` is the whole."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final, cast

import attrs
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from shyped.control import backend as b
from shyped.control import views
from shyped.control.poolpolicy import PoolPolicy, local_file_problem
from shyped.control.protocol import ControlError, ErrorCode
from shyped.core.engine import Outcome, resource_of
from shyped.core.hostfacts import Device, Domain, DomainState
from shyped.core.labelstore import (
    LabelStore,
    LabelStoreError,
    canonical_resource,
    overwrite_problem,
    resolve_resource,
    save_label_store,
)
from shyped.policy.model import Policy
from shyped.service.poolreserve import Reservations
from shyped.service.poolstore import PoolUnavailable

if TYPE_CHECKING:
    from shyped.service.daemon import Daemon

log = Logger(namespace="shyped.control")

#: Seconds between re-checks of waiting admissions (besides the one after every decision).
WAIT_RECHECK: Final = 0.5

_RUNNING: Final = frozenset({DomainState.ADMITTED, DomainState.PAUSED})
#: Frontend kinds of the devices a cfg's ``disk`` and ``vif`` lists create: what shype-xl
#: counts in `wait_admission`'s ``devices`` (libxl also adds a console, decided but not
#: counted; a denied console still fails the admission).
CFG_DEVICE_KINDS: Final = frozenset({"vbd", "vbd3", "vif", "pci"})


#: Domain decisions remembered by UUID (the newest this many) for an admission asked for only
#: after the domain is gone: ``xl create`` returns, then shype-xl asks; meanwhile a loaded host
#: may have decided, vetoed and forgotten the domain, which would otherwise never "appear".
DECIDED_KEPT: Final = 1024


@attrs.frozen
class _Decided:
    """The last domain decision about a UUID."""

    domid: int
    name: str | None
    permitted: bool
    reason: str


@attrs.define(eq=False)
class _Waiter:
    """One `wait_admission` in progress."""

    uuid: str
    devices: int
    deferred: Deferred[b.Admission]
    timer: Any = None
    #: The domid once the domain was seen (to tell "gone" from "not there yet").
    domid: int | None = None
    name: str | None = None


class DaemonBackendBase:
    """The daemon as the control socket sees it, and admissions waited for."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.reactor: Any = daemon.reactor
        #: Called with every control audit event (the audit log hooks in here).
        self.audit_hooks: list[Callable[[b.ControlAudit], None]] = []
        self._waiters: list[_Waiter] = []
        self._decided: OrderedDict[str, _Decided] = OrderedDict()
        self._check_scheduled = False
        self._recheck = LoopingCall(self._check_waiters)
        self._recheck.clock = self.reactor
        self._policy_lock = defer.DeferredLock()
        #: pool mode: policy switches through the pool, placement (`shyped.control.poolpolicy`)
        self.pool_policy = None if daemon.pool is None else PoolPolicy(self, daemon.pool)
        self.reservations = None if daemon.pool is None else Reservations(daemon, daemon.pool)
        daemon.add_listener(self._on_outcome)

    @property
    def _policy(self) -> Policy:
        return self.daemon.engine.policy.policy

    @property
    def _store(self) -> LabelStore:
        return self.daemon.engine.labels

    def _ready(self) -> None:
        if not self.daemon.ready:
            raise ControlError(
                ErrorCode.UNAVAILABLE,
                "shyped is starting: the domains that exist are not all decided yet "
                "(first reconcile); try again in a moment",
            )

    def _full(self, label: str | None) -> str | None:
        """A recorded label as ``ACM:<policy>:<label>`` when the policy has it, else as is."""
        if label is None:
            return None
        policy = self._policy
        name, sep, uuid = label.partition("@")  # a resource assigned to an instance
        if sep and ":" not in label and policy.resource_label(name) is not None:
            return f"{policy.label_string(name)}@{uuid}"
        if ":" not in label and (
            policy.vm_label(label) is not None or policy.resource_label(label) is not None
        ):
            return policy.label_string(label)
        return label

    def _info(self, dom: Domain, cpu: dict[int, float] | None = None) -> b.DomainInfo:
        cpu = self._cpu_seconds() if cpu is None else cpu
        info = views.domain_info(dom, self._full(dom.label), cpu)
        inst = self.daemon.engine.instance_of(dom.domid)
        if inst is not None:
            info = attrs.evolve(info, instance=inst.name)
        flask = self.daemon.flask
        if flask is None:
            return info
        return attrs.evolve(info, flask_context=flask.flask.contexts.get(dom.domid))

    def _cpu_seconds(self) -> dict[int, float] | None:
        """CPU seconds by domid from the metrics' ``xl list`` poll (None: not polled)."""
        metrics = getattr(self.daemon, "metrics", None)
        cpu = None if metrics is None else metrics.snapshot.cpu
        return None if cpu is None else {c.domid: c.seconds for c in cpu}

    def _domains(self) -> tuple[b.DomainInfo, ...]:
        cpu = self._cpu_seconds()
        return tuple(self._info(d, cpu) for d in self.daemon.host.domains())

    def _domain(self, ref: str) -> Domain:
        info = views.match_domain(ref, self._domains())
        dom = self.daemon.host.domain(info.domid)
        if dom is None:  # pragma: no cover - the list was just built from the model
            raise ControlError(ErrorCode.NOT_FOUND, f"no domain {ref[:80]!r}")
        return dom

    def _policy_info(self) -> b.PolicyInfo:
        loaded = self.daemon.loaded
        return b.PolicyInfo(
            name=loaded.policy.name,
            version=str(loaded.policy.version),
            sha256=loaded.sha256,
            format=cast(b.PolicyFormat, loaded.format),
            source=str(loaded.path),
        )

    def _save(self, store: LabelStore) -> None:
        """Persist `store`, then decide with it; a failed write changes nothing."""
        path = self.daemon.config.labels
        pool = self.daemon.pool
        if pool is not None:  # pool mode: refused (nothing changes) while etcd is unreachable
            try:
                pool.check_writable()
            except PoolUnavailable as exc:
                raise ControlError(ErrorCode.UNAVAILABLE, str(exc)) from None
        # Never overwrite a hand edit of the file. A single host's file is the store; in pool
        # mode (docs/pool.md) it is the local copy, compared with what was last read or written.
        problem = (
            overwrite_problem(path, self._store) if pool is None else local_file_problem(path, pool)
        )
        if problem is not None:
            raise ControlError(ErrorCode.INVALID_ARGUMENT, problem)
        previous = self.daemon.engine.labels
        try:
            save_label_store(store, path)
        except OSError as exc:
            raise ControlError(
                ErrorCode.INTERNAL,
                f"cannot write the label store {path}: {exc.strerror or exc}; nothing changed",
            ) from None
        self.daemon.set_labels(store)
        if pool is not None:
            pool.file_labels = store
            pool.publish_labels(previous, store)

    @staticmethod
    def _resource(spec: str) -> str:
        try:
            return canonical_resource(spec)
        except LabelStoreError as exc:
            raise ControlError(ErrorCode.INVALID_ARGUMENT, str(exc)) from None

    def wait_admission(self, args: b.WaitAdmissionArgs) -> Deferred[b.Admission]:
        self._ready()
        uuid = views.canonical_uuid(args.uuid)
        d: Deferred[b.Admission] = Deferred(lambda _: self._drop(waiter))
        waiter = _Waiter(uuid, args.devices, d)
        answer = self._admission(waiter)
        if answer is not None:
            return defer.succeed(answer)
        waiter.timer = self.reactor.callLater(args.timeout, self._timed_out, waiter, args)
        self._waiters.append(waiter)
        if not self._recheck.running:
            self._recheck.start(WAIT_RECHECK, now=False)
        return d

    def _drop(self, waiter: _Waiter) -> None:
        if waiter in self._waiters:
            self._waiters.remove(waiter)
        if waiter.timer is not None and waiter.timer.active():
            waiter.timer.cancel()
        if not self._waiters and self._recheck.running:
            self._recheck.stop()

    def _timed_out(self, waiter: _Waiter, args: b.WaitAdmissionArgs) -> None:
        waiter.timer = None
        self._drop(waiter)
        if waiter.domid is None:
            what = f"no domain with uuid {args.uuid} appeared"
        else:
            what = f"domain {waiter.name or '?'} (domid {waiter.domid}) is not decided"
        waiter.deferred.errback(
            ControlError(
                ErrorCode.ADMISSION_TIMEOUT,
                f"{what} within {args.timeout:g} s (waiting for the domain and "
                f"{args.devices} device(s))",
            )
        )

    def _on_outcome(self, outcome: Outcome) -> None:
        """Every decision: remembered if it is a domain's (`DECIDED_KEPT`); re-check waiting
        admissions once the current batch is done."""
        subject = outcome.subject
        if outcome.kind == "domain" and subject.uuid and subject.domid is not None:
            uuid = subject.uuid.lower()
            self._decided.pop(uuid, None)
            self._decided[uuid] = _Decided(
                subject.domid, subject.name, outcome.allowed, outcome.decision.reason
            )
            if len(self._decided) > DECIDED_KEPT:
                self._decided.popitem(last=False)
        if self._waiters and not self._check_scheduled:
            self._check_scheduled = True
            self.reactor.callLater(0, self._check_waiters)

    def _check_waiters(self) -> None:
        self._check_scheduled = False
        synced = self.daemon.audit_synced()
        if not synced.called:  # answer once the decisions' audit records are durable
            self._check_scheduled = True
            synced.addCallback(lambda _: self._check_waiters())
            return
        for waiter in list(self._waiters):
            answer = self._admission(waiter)
            if answer is not None:
                self._drop(waiter)
                waiter.deferred.callback(answer)

    def _device_verdict(self, dev: Device) -> b.DeviceVerdict:
        assert dev.decision is not None
        rid = resource_of(dev.key.kind, dev.resource) if dev.resource is not None else None
        rid = resolve_resource(rid) if rid is not None else None
        return b.DeviceVerdict(
            kind=dev.key.kind,
            devid=dev.key.devid,
            backend_domid=dev.backend,
            permitted=dev.decision.allowed,
            reason=dev.decision.reason,
            resource=rid or dev.resource,
        )

    def _admission(self, waiter: _Waiter) -> b.Admission | None:
        """The answer for `waiter` if there is one now, else None."""
        host = self.daemon.host
        dom = host.domain_by_uuid(waiter.uuid)
        if dom is None or dom.state is DomainState.GONE:
            last = self._decided.get(waiter.uuid)
            if last is not None and waiter.domid not in (None, last.domid):
                last = None  # the domain this waiter saw was never decided
            if last is None:
                if waiter.domid is None:
                    return None  # not there yet
                return b.Admission(
                    waiter.domid, waiter.name, waiter.uuid, False, "gone", "the domain is gone"
                )
            # decided, then gone (vetoed, or it went away) before or while the client asked
            why = "the domain is gone" if last.permitted else last.reason
            return b.Admission(last.domid, last.name, waiter.uuid, False, "gone", why)
        waiter.domid, waiter.name = dom.domid, dom.name
        if dom.state is DomainState.SEEN or dom.decision is None:
            return None
        decided = [
            dev
            for dev in host.devices_of(dom.domid)
            if dev.key.frontend == dom.domid and dev.decision is not None
        ]
        verdicts = tuple(self._device_verdict(dev) for dev in decided)
        admitted = dom.state in _RUNNING
        denied_device = any(not v.permitted for v in verdicts)
        counted = sum(v.kind in CFG_DEVICE_KINDS for v in verdicts)
        if admitted and not denied_device and counted < waiter.devices:
            return None
        return b.Admission(
            domid=dom.domid,
            name=dom.name,
            uuid=waiter.uuid,
            admitted=admitted,
            state=dom.state.value,
            reason=dom.decision.reason,
            devices=verdicts,
            instance=inst.name if (inst := self.daemon.engine.instance_of(dom.domid)) else None,
        )

    def forget_decided(self, uuid: str) -> None:
        """A new domain will hold `uuid` (registered for it): its admission is waited for
        afresh, not answered by the last decision about the UUID."""
        self._decided.pop(uuid.lower(), None)

    def _record(self, kind: str, **details: object) -> None:
        """An audit record through the daemon's audit trail, if it keeps one."""
        trail = self.daemon.audit
        if trail is None:
            return
        try:
            d = trail.record_event(kind, **details)
        except Exception:
            log.failure("audit: cannot record {kind}", kind=kind)
            return
        d.addErrback(lambda f: log.failure("audit: record of {kind} failed", f, kind=kind))
