"""Policy and label management at run time: mode switch, relabels, policy reload."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import attrs
from twisted.internet import defer, threads
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from shyped.core.actions import (
    WriteLabel,
)
from shyped.core.audit import Kind as AuditKind
from shyped.core.labelstore import (
    LabelStore,
    LabelStoreError,
    load_label_store,
    save_label_store,
)
from shyped.core.relabel import RelabelCheck, check_domain_relabel, check_resource_relabel
from shyped.core.xenflask import Step
from shyped.policy import update
from shyped.policy.decisions import PolicyEngine
from shyped.policy.errors import PolicyError
from shyped.policy.update import Reason, UpdateProblem
from shyped.service.config import Mode
from shyped.service.eventpath import (
    DaemonCore,
)
from shyped.service.flaskdaemon import FlaskCoupling
from shyped.service.policyload import (
    LoadedPolicy,
    load_policy,
)
from shyped.service.startcheck import dom0_problem, store_warnings

_log = Logger(namespace="shyped.daemon")


@attrs.frozen
class ReloadResult:
    """What a policy reload did: `applied`, or why not (`problems`, or a load `error`)."""

    applied: bool
    path: str
    previous: str
    new: str | None = None
    sha256: str | None = None
    problems: tuple[str, ...] = ()
    error: str | None = None
    #: The label store could not be reloaded (the old one stays): every problem, one a line.
    label_store_error: str | None = None

    def __str__(self) -> str:
        if self.applied:
            return f"policy {self.previous} -> {self.new} applied"
        if self.error is not None:
            return f"policy reload from {self.path} failed: {self.error}"
        head = f"policy update {self.previous} -> {self.new} refused"
        return "\n  ".join([head + f" ({len(self.problems)} reasons):", *self.problems])


class PolicyAndLabels(DaemonCore):
    """Mode switches, label changes and policy reloads at run time (SIGHUP, the control
    socket): each checked against the running system, then everything decided again."""

    #: Xen's FLASK, switched with the daemon's policy (set by `shyped.service.daemon.Daemon`).
    flask: FlaskCoupling | None = None
    #: Reloads (SIGHUP, ``policy load``) that found the label store unusable and kept the old.
    label_store_reload_failures: int = 0
    _store_error: str | None = None

    def set_mode(self, mode: Mode) -> None:
        """Switch between enforcing and permissive at run time; to enforcing re-decides all."""
        if mode is self.engine.mode:
            return
        previous, self.engine.mode = self.engine.mode, mode
        _log.warn("mode {old} -> {new}", old=previous.value, new=mode.value)
        self._audit_event(AuditKind.MODE_CHANGE, old=previous.value, new=mode.value)
        if self.metrics is not None:
            self.metrics.set_mode(mode)
        if mode is Mode.ENFORCING:
            if self.flask is not None and self.flask.present:  # not amid a relabel
                self.flask.relabel_lock.run(self._sweep, "mode switched to enforcing")
            else:
                self._sweep("mode switched to enforcing")

    def set_labels(self, labels: LabelStore) -> None:
        """Decide from `labels` from now on (running domains keep the label they run with)."""
        self.engine.labels = labels

    def check_resource_relabel(
        self, resource: str, label: str | None, bound_to: str | None = None
    ) -> RelabelCheck:
        """May `resource` (a label store id) take `label` (None: unlabelled), assigned to the
        instance of UUID `bound_to` if given, with the running domains' current uses (see
        `shyped.core.relabel`)? Changes nothing."""
        system = self.engine.running_system(self.host)

        def instance_uuid(domid: int) -> str | None:
            inst = self.engine.instance_of(domid)
            return None if inst is None else inst.uuid

        return check_resource_relabel(
            self.engine.policy,
            system,
            resource,
            label,
            bound_to=bound_to,
            instance_uuid=instance_uuid,
        )

    def relabel(
        self, domid: int, label: str, *, before: Callable[[], None] | None = None
    ) -> Deferred[RelabelCheck]:
        """Relabel running domain `domid` if the Chinese Wall and its live channels and
        resources allow `label` (`shyped.core.relabel.check_domain_relabel`); else change nothing.

        With Xen's FLASK the domain is relabelled in Xen first (docs/flask.md): if Xen
        refuses, the relabel is refused and nothing changes. `before` runs once the checks
        passed and before the daemon changes anything (the control socket persists the label
        store there); if it raises, nothing changes (Xen is put back). Then the Chinese Wall
        count, the host model and the label node in xenstore take the new label; the Deferred
        fires with the check once the label node is written.
        """
        if self.flask is None or not self.flask.present:
            return self._relabel_now(self._relabel_check(domid, label), before)
        return Deferred.fromCoroutine(self._relabel_in_xen_first(self.flask, domid, label, before))

    def _relabel_check(self, domid: int, label: str) -> RelabelCheck:
        system = self.engine.running_system(self.host)
        return check_domain_relabel(self.engine.policy, system, domid, label)

    async def _relabel_in_xen_first(
        self,
        flask: FlaskCoupling,
        domid: int,
        label: str,
        before: Callable[[], None] | None,
    ) -> RelabelCheck:
        async with flask.relabel_lock:  # no other relabel, reload or sweep meanwhile
            return await self._relabel_locked(flask, domid, label, before)

    async def _relabel_locked(
        self,
        flask: FlaskCoupling,
        domid: int,
        label: str,
        before: Callable[[], None] | None,
    ) -> RelabelCheck:
        check = self._relabel_check(domid, label)
        dom = self.host.domain(domid)
        if not check.allowed or dom is None or check.new is None:
            return check
        plan = await flask.relabel_running(domid, dom.name, check.old, check.new)
        if plan is not None and plan.step is Step.REFUSE:
            problem = UpdateProblem(Reason.LABEL, f"Xen FLASK: {plan.reason}", (domid,))
            return attrs.evolve(check, problems=(problem,))
        # The running system may have changed while Xen relabelled: decide again
        again = self._relabel_check(domid, label)
        if again != check or self.host.domain(domid) is None:
            await flask.relabel_back(domid, dom.name, plan)
            if not again.allowed:
                return again
            why = f"domain {domid} changed during its relabel in Xen (undone): try again"
            return attrs.evolve(again, problems=(UpdateProblem(Reason.LABEL, why, (domid,)),))
        try:
            if before is not None:
                before()  # the label store: if it cannot be written, Xen is put back
        except BaseException:
            await flask.relabel_back(domid, dom.name, plan)
            raise
        return await self._relabel_now(check, None)

    def _relabel_now(
        self, check: RelabelCheck, before: Callable[[], None] | None
    ) -> Deferred[RelabelCheck]:
        """Apply an allowed `check` in the daemon (`before` first: if it raises, nothing)."""
        domid = check.subject
        assert isinstance(domid, int)
        dom = self.host.domain(domid)
        if not check.allowed or dom is None or check.new is None:
            return defer.succeed(check)
        if before is not None:
            before()
        self.engine.relabel(domid, check.new)
        self.host.set_label(domid, check.new)
        written = self.enforcer.execute_action(
            WriteLabel(domid, dom.uuid, self.engine.label_string(check.new))
        )
        self._audit_event(
            AuditKind.RELABEL, domid=domid, name=dom.name, uuid=dom.uuid,
            old=check.old, new=check.new,
        )  # fmt: skip
        _log.warn(
            "relabel: {name}({domid}{uuid}) {old} -> {new}",
            name=dom.name or "?",
            domid=domid,
            uuid=f", {dom.uuid}" if dom.uuid else "",
            old=check.old,
            new=check.new,
        )
        return written.addCallback(lambda _: check)

    def reload_policy(self, path: str | Path | None = None) -> Deferred[ReloadResult]:
        """Load a policy (default: the configured file) and switch to it if the running
        system satisfies it; the label store is re-read first. Never fails: see the result.
        With Xen's FLASK, not amid a relabel of a running domain (it re-decides them all)."""
        if self.flask is not None and self.flask.present:
            return self.flask.relabel_lock.run(
                lambda: Deferred.fromCoroutine(self._reload_store_too(path))
            )
        return Deferred.fromCoroutine(self._reload_store_too(path))

    async def _reload_store_too(self, path: str | Path | None) -> ReloadResult:
        result = await self._reload(Path(path) if path else self.config.policy)
        if self._store_error is not None:
            return attrs.evolve(result, label_store_error=self._store_error)
        warnings = await threads.deferToThreadPool(
            self.reactor, self.reactor.getThreadPool(), store_warnings, self.config, self.loaded
        )
        for warning in warnings:  # assignments of labels the active policy lacks
            _log.warn("label store: {warning}", warning=warning)
        return result

    async def _reload(self, path: Path) -> ReloadResult:
        previous = f"{self.loaded.policy.name} {self.loaded.policy.version}"
        try:
            labels = await threads.deferToThreadPool(
                self.reactor,
                self.reactor.getThreadPool(),
                load_label_store,
                self.config.labels,
            )
        except LabelStoreError as e:
            self._store_failed(str(e))
        else:
            problem = dom0_problem(self.config.labels, labels, self.engine.policy.policy)
            if problem is not None:
                self._store_failed(problem)
            else:
                self._store_error = None
                self.engine.labels = labels
        try:
            loaded: LoadedPolicy = await threads.deferToThreadPool(
                self.reactor, self.reactor.getThreadPool(), load_policy, path
            )
        except (PolicyError, OSError) as e:
            text = str(e) if isinstance(e, PolicyError) else f"cannot read: {e.strerror or e}"
            result = ReloadResult(False, str(path), previous, error=text)
            _log.error("{result}", result=str(result))
            self._audit_event(AuditKind.POLICY_REJECT, path=str(path), error=text)
            return result
        new = f"{loaded.policy.name} {loaded.policy.version}"
        if loaded.sha256 == self.loaded.sha256:
            _log.info("policy {path} unchanged (sha256 {sha}); nothing to do", path=str(path),
                      sha=loaded.sha256[:16])  # fmt: skip
            return ReloadResult(False, str(path), previous, new, loaded.sha256,
                                problems=("the policy is unchanged",))  # fmt: skip
        current = self.engine.policy.policy
        check = update.check_update(current, loaded.policy, self.engine.running_system(self.host))
        if not check.allowed:
            problems = tuple(str(p) for p in check.problems)
            result = ReloadResult(False, str(path), previous, new, loaded.sha256, problems)
            _log.error("{result}; keeping {previous}", result=str(result), previous=previous)
            self._audit_event(
                AuditKind.POLICY_REJECT, path=str(path), policy=new, policy_sha256=loaded.sha256,
                problems=list(problems),
            )  # fmt: skip
            return result
        if self.flask is not None:  # Xen's policy first: if Xen refuses, nothing switches
            running = self.engine.running.running_labels()
            renamed = sorted(n for n in check.maps.vm_renames if n in running)
            refused = await self.flask.switch(loaded.policy, renamed)
            if refused is None:  # the running system may have changed while Xen loaded
                check = update.check_update(
                    current, loaded.policy, self.engine.running_system(self.host)
                )
                if not check.allowed:
                    await self.flask.revert()
                    refused = "; ".join(str(p) for p in check.problems)
            if refused is not None:
                result = ReloadResult(False, str(path), previous, new, loaded.sha256, error=refused)
                _log.error("{result}; keeping {previous}", result=str(result), previous=previous)
                self._audit_event(AuditKind.POLICY_REJECT, path=str(path), error=refused)
                return result
        try:
            self._switch(loaded, check)
        except OSError as e:
            if self.flask is not None:
                await self.flask.revert()
            text = f"cannot rewrite the label store {self.config.labels}: {e.strerror or e}"
            result = ReloadResult(False, str(path), previous, new, loaded.sha256, error=text)
            _log.error("{result}; keeping {previous}", result=str(result), previous=previous)
            self._audit_event(AuditKind.POLICY_REJECT, path=str(path), error=text)
            return result
        dom0 = self.host.domain(0)
        if dom0 is not None:
            dom0.label = self.engine.dom0_label()
        self.loaded = loaded
        self._audit_event(
            AuditKind.POLICY_LOAD, path=str(path), previous=previous, policy=new,
            policy_sha256=loaded.sha256,
        )  # fmt: skip
        if self.metrics is not None:
            self.metrics.set_policy(loaded.policy, loaded.sha256, time.time())
        _log.warn(
            "policy {old} -> {new} applied (sha256 {sha})",
            old=previous,
            new=new,
            sha=loaded.sha256[:16],
        )
        self._publish_dom0_label()
        self._sweep("policy reload")
        return ReloadResult(True, str(path), previous, new, loaded.sha256)

    def _store_failed(self, error: str) -> None:
        self._store_error = error
        self.label_store_reload_failures += 1
        _log.error(
            "label store not reloaded, keeping the one in use (failure {n}):\n{error}",
            n=self.label_store_reload_failures,
            error=error,
        )

    @property
    def label_store_error(self) -> str | None:
        """Why the last reload kept the label store in use, None when it reloaded."""
        return self._store_error

    def _switch(self, loaded: LoadedPolicy, check: update.UpdateCheck) -> None:
        """Switch to an allowed policy together with the label store: labels the update
        renames (``from=``) are rewritten in the store, which is written (atomically) before
        the switch; if the switch fails the old store is written back. `OSError`: the store
        could not be written, nothing changed."""
        old = self.engine.labels
        dom0 = check.domain_labels.get(0)
        labels = old.after_update(
            old_policy=self.engine.policy.policy.name,
            vm=check.maps.vm,
            resource=check.maps.resource,
            dom0=None if dom0 is None or dom0.label == loaded.policy.bootstrap else dom0.label,
        )
        if labels != old:
            save_label_store(labels, self.config.labels)
        try:
            self.engine.switch_policy(PolicyEngine(loaded.policy), check)
        except BaseException:
            if labels != old:
                save_label_store(old, self.config.labels)
            raise
        if labels != old:
            self.engine.labels = labels
            renamed = {**check.maps.vm_renames, **check.maps.resource_renames}
            if renamed:
                _log.warn(
                    "label store {path}: renamed labels rewritten ({renames})",
                    path=str(self.config.labels),
                    renames=", ".join(f"{o} -> {n}" for o, n in sorted(renamed.items())),
                )
            marked = sorted(set(labels.invalidated()) - set(old.invalidated()))
            if marked:
                _log.warn(
                    "label store {path}: assignments of deleted labels marked invalid (they "
                    "deny until labelled again): {marked}",
                    path=str(self.config.labels),
                    marked="; ".join(marked),
                )
