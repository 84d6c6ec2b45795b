"""The daemon's records of its decisions (see `shyped.service.daemon` for the whole): the
audit trail's decision and event records, which gate enforcing actions (fail-closed when the
trail cannot record), and the pacing of guest-triggered decisions into counted summaries.
`DecisionRecords` is a part of `shyped.service.eventpath.DaemonCore`."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from shyped.core.actions import is_veto
from shyped.core.audit import Kind as AuditKind
from shyped.core.engine import Engine, Outcome
from shyped.core.host import HostModel
from shyped.core.hostfacts import NeedsDecision
from shyped.core.repeats import PacedDecisions
from shyped.policy.decisions import Rule
from shyped.service.auditlog import AsyncAuditLog, AuditState, AuditUnavailable
from shyped.service.config import Mode
from shyped.service.metrics import MetricsState
from shyped.service.policyload import LoadedPolicy

_log = Logger(namespace="shyped.daemon")

#: Decisions a guest triggers at its own pace (grants and rendezvous in its own subtree): the
#: first of each (guest, kind, verdict, peers) and `GUEST_REPEAT_BURST` more per guest are
#: written in full per interval, the rest only counted and summarised once per
#: `GUEST_REPEAT_INTERVAL` seconds (one ``decision-repeats`` audit record and log line per
#: guest), so no guest can fill the log or rotate the audit trail's older records away
#: (`shyped.core.repeats.PacedDecisions`). Vetoes are carried out all the same.
GUEST_REPEAT_BURST = 20
GUEST_REPEAT_INTERVAL = 60.0
_GUEST_PACED_KINDS = frozenset({"vchan", "channel"})


class DecisionRecords:
    """The audit records of decisions and daemon events, and guest-paced decisions counted
    (`PacedDecisions`); every method runs on the reactor thread."""

    # what DaemonCore provides
    audit: AsyncAuditLog | None
    metrics: MetricsState | None
    loaded: LoadedPolicy
    engine: Engine
    host: HostModel
    event_observers: list[Callable[[str], None]]
    _unsynced: set[Deferred[Any]]
    _repeats: PacedDecisions

    def _emit(self, outcome: Outcome, *, record: bool = True) -> None:
        raise NotImplementedError

    def _decide(self, queue: deque[NeedsDecision], received: float | None = None) -> None:
        raise NotImplementedError

    def _in_full(self, outcome: Outcome) -> bool:
        """False for a guest-paced decision that is only counted (`PacedDecisions`)."""
        if outcome.kind not in _GUEST_PACED_KINDS:
            return True
        d, need = outcome.decision, outcome.need
        what = f"{d.verdict} {need.kind} [{d.rule}]"
        peers = tuple(sorted(need.peers)) + ((-1,) if need.any_peer else ())
        return self._repeats.note(need.domid, need.kind, d.verdict, peers, what)

    def _flush_repeats(self) -> None:
        """One log line and one audit record per guest decided more often than its burst."""
        for r in self._repeats.flush():
            who = "other domains" if r.key < 0 else f"domain {r.key}"
            text = (
                f"{r.count} more decision(s) about channels of {who} in "
                f"{GUEST_REPEAT_INTERVAL:g} s ({r.kinds_text()}), recorded as this count only"
            )
            _log.warn("decision: {text}", text=text)
            self._audit_event(
                AuditKind.DECISION_REPEATS, subject_domid=r.key, count=r.count,
                kinds=dict(r.kinds), summary=text,
            )  # fmt: skip

    def audit_event(self, kind: AuditKind | str, **details: object) -> Deferred[Any] | None:
        """Record a daemon event (e.g. ``resource-label`` from the control socket); fires
        once durable, None without an audit trail. Never raises."""
        return self._audit_event(kind, **details)

    def _audit_event(self, kind: AuditKind | str, **details: object) -> Deferred[Any] | None:
        return self._audit_event_as(kind, details)

    def _audit_event_as(
        self, kind: AuditKind | str, details: dict[str, object], *, at_head: bool = False
    ) -> Deferred[Any] | None:
        """Record a daemon event (`at_head`: naming the chain head it follows, `HeadDraft`)."""
        for observe in self.event_observers:  # e.g. TPM measurements (service.attestation)
            observe(str(kind))
        if self.audit is None:
            return None
        try:
            record = self.audit.record_event_at_head if at_head else self.audit.record_event
            d = record(kind, **details)
        except Exception:
            _log.failure("audit: cannot record {kind}", kind=str(kind))
            return None
        return d.addErrback(_audit_lost, str(kind))

    def _audit_decision(self, outcome: Outcome) -> Deferred[Any] | None:
        """Record `outcome`; the Deferred fires once its fsync returned. In enforcing mode a
        permit whose record cannot be written (fail-closed) is turned into the veto."""
        if self.audit is None:
            return None
        details: dict[str, object] = {
            "what": outcome.what,
            "actions": [a.describe() for a in outcome.actions if is_veto(a)],
        }
        if outcome.resource is not None:
            details["resource"] = outcome.resource
        if outcome.clients:
            details["clients"] = list(outcome.clients)
        if outcome.planned and not outcome.enforced:
            details["not_enforced"] = outcome.note or "not enforced"
        try:
            d = self.audit.record_decision(
                outcome.decision,
                subject=outcome.subject,
                obj=outcome.peer,
                policy_sha256=self.loaded.sha256,
                mode=outcome.mode.value,
                **details,
            )
        except Exception:
            _log.failure("audit: cannot record {what}", what=outcome.what)
            return None
        d.addErrback(self._audit_record_failed, outcome)
        self._unsynced.add(d)
        d.addBoth(self._record_synced, d)
        return d

    def _record_synced(self, result: object, d: Deferred[Any]) -> object:
        self._unsynced.discard(d)
        return result

    def audit_synced(self) -> Deferred[None]:
        """Fires once the record of every decision taken so far is durable, or refused (then
        a permit has been turned into a veto): the control socket answers admissions only
        then. Already fired without an audit trail or nothing pending."""
        if not self._unsynced:
            return defer.succeed(None)
        pending = defer.DeferredList(list(self._unsynced), consumeErrors=True)
        return pending.addCallback(lambda _: None)

    def _audit_record_failed(self, failure: Failure, outcome: Outcome) -> None:
        _audit_lost(failure, outcome.what)
        if (
            not isinstance(failure.value, AuditUnavailable)
            or not outcome.allowed
            or outcome.mode is not Mode.ENFORCING
            or not self.host.is_current(outcome.need)
        ):
            return
        refused = self.engine.refuse(outcome.need, self.host, Rule.AUDIT, self._audit_reason())
        ready = self.host.record_decision(
            refused.need, False, label=outcome.label, reason=refused.decision.reason
        )
        self._emit(refused, record=False)  # it cannot be recorded: that is why it is denied
        self._decide(deque(ready))

    def _audit_refusing(self) -> bool:
        """Fail-closed: the trail cannot record, so nothing new is allowed."""
        return self.audit is not None and not self.audit.available

    def _audit_reason(self) -> str:
        return (
            "the audit trail cannot record decisions (disk_full_action = fail-closed): "
            "nothing new is allowed until it can"
        )

    def _audit_state(self, state: AuditState, reason: str) -> None:
        if state is AuditState.OK:
            _log.warn("audit trail writable again ({reason}): decisions resume", reason=reason)
        else:
            _log.critical(
                "AUDIT TRAIL {state}: {reason}; new domains, devices and vchans are {what}",
                state=state.value.upper(),
                reason=reason,
                what="DENIED" if state is AuditState.UNAVAILABLE else "decided but not recorded",
            )
        if self.metrics is not None:
            self.metrics.dirty = True


def _audit_lost(failure: Failure, what: str) -> None:
    if isinstance(failure.value, AuditUnavailable):
        return  # the state listener said it loudly once
    _log.failure("audit: record of {what} failed", failure, what=what)
