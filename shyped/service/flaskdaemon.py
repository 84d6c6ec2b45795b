"""The daemon's decisions coupled with Xen's FLASK (`FlaskCoupling`).

`shyped.service.flaskxen.FlaskXen` talks to Xen; this module says when, and what follows:

- at start: FLASK detected, the policy loaded (a load Xen refuses stops the start), one
  ``flask-state`` and one ``flask-load`` audit record;
- a domain the engine admits: before its admission is carried out (the enforcer waits for
  this listener's Deferred) and before the control socket answers ``wait_admission``, its
  context in Xen is checked and an unlabelled domain relabelled; a domain Xen refuses to
  relabel, or that runs in Xen under another label, is refused (the permit turns into the
  hook's veto, rule ``label``);
- ``shypectl addlabel L mgt DOMAIN`` of a running domain (`relabel_running`): relabelled in
  Xen before the daemon relabels it; Xen refuses → the daemon refuses; the daemon fails after Xen
  accepted → `relabel_back`;
- a policy switch (`switch`): compiled and loaded into Xen before the daemon switches; if
  Xen refuses, the daemon keeps its policy (`revert` loads Xen's previous one back when the
  daemon's switch fails after Xen's);
- AVC denials read from Xen's console ring: one ``flask-avc`` audit record each, at most
  `AVC_RECORDS_PER_READ` per read in full and the rest counted in one ``flask-avc-repeats``
  record (a guest can provoke denials at will and must not fill the trail), and the metric.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Final

from twisted.internet.defer import Deferred, DeferredLock
from twisted.logger import Logger

from shyped.core.audit import Kind as AuditKind
from shyped.core.engine import Outcome
from shyped.core.xenflask import AvcRecord, DomainPlan, Step, denial_summary
from shyped.policy.decisions import Rule
from shyped.policy.model import Policy
from shyped.service.flaskbuild import FlaskBuildError
from shyped.service.flaskxc import FlaskError
from shyped.service.flaskxen import FlaskXen, Prepared
from shyped.service.metrics import FlaskMetrics

if TYPE_CHECKING:
    from shyped.service.eventpath import DaemonCore

_log = Logger(namespace="shyped.flask")

#: AVC denials written in full per console read; the rest are counted in one record.
AVC_RECORDS_PER_READ: Final = 50


class FlaskStartError(Exception):
    """Xen has FLASK and the policy could not be compiled or loaded: the daemon must not start."""


class FlaskCoupling:
    """Couples a daemon (`DaemonCore`) with Xen's FLASK (`FlaskXen`)."""

    def __init__(self, core: DaemonCore, flask: FlaskXen) -> None:
        self.core = core
        self.flask = flask
        self._by_class: dict[str, int] = {}
        #: Xen's policy before the last switch (loaded back by `revert`).
        self._previous: Prepared | None = None
        #: Held by a relabel of a running domain (from Xen's relabel to the daemon's) and by
        #: what re-decides every domain (policy reload, switch to enforcing): no domain is
        #: decided while Xen and the daemon hold different labels for it.
        self.relabel_lock = DeferredLock()
        flask.on_avc = self._avc

    @property
    def present(self) -> bool:
        return self.flask.present

    async def start(self, policy: Policy) -> None:
        """Detect FLASK and, when present, load `policy` into Xen (`FlaskStartError`)."""
        try:
            await self.flask.start(policy)
        except (FlaskError, FlaskBuildError) as e:
            self.core.audit_event(AuditKind.FLASK_STATE, mode=self.flask.mode.value, error=str(e))
            raise FlaskStartError(f"Xen FLASK is {self.flask.mode.value}: {e}") from None
        self.core.audit_event(
            AuditKind.FLASK_STATE,
            mode=self.flask.mode.value,
            reason=None if self.present else self.flask.reason,
        )
        if self.present:
            assert self.flask.loaded is not None
            self._audit_load(self.flask.loaded, "start")
            self.core.listeners.insert(0, self._on_outcome)
        self.publish()

    def stop(self) -> None:
        self.flask.stop()

    # ------------------------------------------------------------------ policy switches

    async def switch(self, policy: Policy, renamed_running: Sequence[str] = ()) -> str | None:
        """Compile and load `policy` into Xen before the daemon switches to it: None when
        done (or FLASK is absent), else why not (Xen keeps its policy, so must the daemon).

        `renamed_running`: labels of running domains the update renames. Refused: their FLASK
        types would vanish from Xen's policy, and Xen cannot convert those domains' contexts
        (docs/flask.md, "Known gaps")."""
        if not self.present:
            return None
        if renamed_running:
            return (
                "Xen has FLASK: an update may not rename the label of a running domain "
                f"({', '.join(renamed_running)}): its FLASK type would vanish from Xen's policy"
            )
        try:
            prepared = await self.flask.prepare(policy)
        except (FlaskError, FlaskBuildError) as e:
            return f"cannot compile the policy for Xen's FLASK: {e}"
        previous = self.flask.loaded
        try:
            await self.flask.load(prepared)
        except FlaskError as e:
            self.core.audit_event(
                AuditKind.FLASK_LOAD, result="refused", policy_sha256=prepared.sha256, error=str(e)
            )
            return f"Xen refused the FLASK policy: {e}"
        self._previous = previous
        self._audit_load(prepared, "policy switch")
        self.publish()
        return None

    async def revert(self) -> None:
        """The daemon did not switch after Xen did: load Xen's previous policy back."""
        previous = self._previous
        if not self.present or previous is None:
            return
        try:
            await self.flask.load(previous)
        except FlaskError as e:
            _log.critical(
                "Xen FLASK: cannot load the previous policy back ({e}): Xen and shyped now "
                "hold different policies",
                e=str(e),
            )
            return
        self._audit_load(previous, "reverted")
        self.publish()

    def _audit_load(self, prepared: Prepared, why: str) -> None:
        self.core.audit_event(
            AuditKind.FLASK_LOAD, result="loaded", policy_sha256=prepared.sha256, reason=why,
            policy=f"{self.core.loaded.policy.name} {self.core.loaded.policy.version}",
        )  # fmt: skip

    # ------------------------------------------------------------------ domains

    def _on_outcome(self, outcome: Outcome) -> Deferred[Any] | None:
        """A decision listener: an admitted domain is checked (and relabelled) in Xen before
        its admission is carried out or answered."""
        if outcome.kind != "domain" or not outcome.allowed or outcome.need.domid == 0:
            return None
        d = Deferred.fromCoroutine(self._label(outcome))
        core = self.core
        core._unsynced.add(d)  # wait_admission answers once this is done
        d.addBoth(core._record_synced, d)
        return d

    async def _label(self, outcome: Outcome) -> None:
        domid = outcome.need.domid
        plan = await self.flask.ensure_domain(domid, outcome.label)
        if plan.step is Step.RELABEL:
            _log.warn("Xen FLASK: domain {domid} {reason}", domid=domid, reason=plan.reason)
            self.core.audit_event(
                AuditKind.FLASK_RELABEL, domid=domid, name=outcome.need.name, old=plan.have,
                new=plan.want, result="relabelled", reason="admission",
            )  # fmt: skip
        elif plan.step is Step.REFUSE:
            self._refuse(outcome, plan.reason)
        self.publish()

    async def relabel_running(
        self, domid: int, name: str | None, old: str | None, new: str
    ) -> DomainPlan | None:
        """``shypectl addlabel L mgt DOMAIN`` of running domain `domid` from label `old` to
        `new`, in Xen first: the plan carried out (a REFUSE means Xen is unchanged and the
        daemon must refuse the relabel too), None when FLASK is absent or for dom0
        (``dom0_t`` whatever its label). Audited: ``flask-relabel`` with ``result``
        relabelled or refused."""
        if not self.present or domid == 0:
            return None
        plan = await self.flask.relabel_running(domid, old, new)
        if plan.step is Step.RELABEL:
            self.core.audit_event(
                AuditKind.FLASK_RELABEL, domid=domid, name=name, old=plan.have, new=plan.want,
                result="relabelled", reason="relabel",
            )  # fmt: skip
        elif plan.step is Step.REFUSE:
            _log.warn("Xen FLASK: relabel of domain {domid} refused: {r}", domid=domid,
                      r=plan.reason)  # fmt: skip
            self.core.audit_event(
                AuditKind.FLASK_RELABEL, domid=domid, name=name, old=plan.have, new=plan.want,
                result="refused", error=plan.reason,
            )  # fmt: skip
        self.publish()
        return plan

    async def relabel_back(self, domid: int, name: str | None, plan: DomainPlan | None) -> None:
        """The daemon could not relabel after Xen did (`relabel_running`): put Xen back. If
        Xen refuses that too, the two disagree until the domain is decided again: every
        decision of it (a policy switch, the daemon's restart) checks its context in Xen and
        vetoes it then (fail closed); it is logged and audited (``result=undo-failed``)."""
        if plan is None or plan.step is not Step.RELABEL or plan.have is None:
            return
        if self.core.host.domain(domid) is None:
            return  # gone meanwhile: nothing left to put back
        try:
            await self.flask.relabel_back(domid, plan)
        except FlaskError as e:
            _log.critical(
                "Xen FLASK: cannot put domain {domid} back to {old} ({e}): it runs in Xen as "
                "{new} while shyped keeps its old label; its next decision vetoes it",
                domid=domid, old=plan.have, new=plan.want, e=str(e),
            )  # fmt: skip
            self.core.audit_event(
                AuditKind.FLASK_RELABEL, domid=domid, name=name, old=plan.want, new=plan.have,
                result="undo-failed", error=str(e),
            )  # fmt: skip
        else:
            self.core.audit_event(
                AuditKind.FLASK_RELABEL, domid=domid, name=name, old=plan.want, new=plan.have,
                result="relabelled", reason="undone: the daemon's relabel failed",
            )  # fmt: skip
        self.publish()

    def _refuse(self, outcome: Outcome, reason: str) -> None:
        """Turn a domain permit into the veto (as a permit whose audit record failed)."""
        core = self.core
        text = f"Xen FLASK: {reason}"
        _log.warn("domain {domid}: {text}", domid=outcome.need.domid, text=text)
        if not core.host.is_current(outcome.need):
            return
        refused = core.engine.refuse(outcome.need, core.host, Rule.LABEL, text)
        ready = core.host.record_decision(
            refused.need, False, label=outcome.label, reason=refused.decision.reason
        )
        core._emit(refused)
        core._decide(deque(ready))

    # ------------------------------------------------------------------ AVC denials

    def _avc(self, records: Sequence[AvcRecord]) -> None:
        for cls, n in denial_summary(records).items():
            self._by_class[cls] = self._by_class.get(cls, 0) + n
        for r in records[:AVC_RECORDS_PER_READ]:
            _log.warn(
                "Xen FLASK denied {perms} on {tclass}: {s} -> {t}",
                perms=" ".join(r.perms), tclass=r.tclass, s=r.scontext, t=r.tcontext,
            )  # fmt: skip
            self.core.audit_event(AuditKind.FLASK_AVC, **r.details())
        rest = records[AVC_RECORDS_PER_READ:]
        if rest:
            self.core.audit_event(
                AuditKind.FLASK_AVC_REPEATS, count=len(rest), by_class=denial_summary(rest)
            )
        self.publish()

    def publish(self) -> None:
        metrics = self.core.metrics
        if metrics is None:
            return
        metrics.set_flask(
            FlaskMetrics(
                mode=self.flask.mode.value,
                policy_sha256=None if self.flask.loaded is None else self.flask.loaded.sha256,
                denials=tuple(sorted(self._by_class.items())),
                relabels=self.flask.relabels,
            )
        )
