"""The control socket's view of the running daemon: `DaemonControlBackend` (a `ControlBackend`).

Edge code (imperative shell): each op reads the `Daemon`'s own objects — its host model, its
`Engine` (policy engine, Chinese Wall `RunningSet`, label store) — and answers with the pure
helpers of `shyped.control.views` and `shyped.core.relabel`, so an answer cannot drift from
enforcement: a dry run asks the same engine, with the same running set and label store, the
daemon decides with when the domain appears.

Choices worth knowing:

- **Not ready, no answer**: until the daemon's first reconcile is done, every op that depends
  on the host or changes anything is refused with ``unavailable``; ``status`` answers (with
  ``ready: false``), and so do the ops that only read the policy or the label store.
- **Label store writes** (``register_domain``, ``relabel_domain``, ``set_resource_label``)
  are atomic file replacements (temp file, fsync, rename) done on the reactor thread *before*
  the in-memory change, so the file and the daemon never disagree and a failed write changes
  nothing. The file is small; this blocks the reactor for an fsync, a few ms, on an admin op.
- **wait_admission** listens to the daemon's decisions (`Daemon.add_listener`) and re-checks
  waiting admissions after each; a domain that is denied, or any of whose devices is denied,
  answers at once (shype-xl destroys it) without waiting for the other devices. Only disks
  and vifs count toward the number of devices asked for (`CFG_DEVICE_KINDS`). A slow
  re-check (every `WAIT_RECHECK` s) also notices a domain that vanished.
"""

from __future__ import annotations

import os
from typing import Any, cast

from twisted.internet.defer import Deferred

from shyped import __version__
from shyped.control import attestserve, views
from shyped.control import backend as b
from shyped.control.admission import (
    _RUNNING,
    CFG_DEVICE_KINDS,
    WAIT_RECHECK,
    log,
)
from shyped.control.attestops import AttestAk, AttestQuote, AttestQuoteArgs
from shyped.control.policyops import PolicyOps
from shyped.control.protocol import ControlError, ErrorCode
from shyped.core.audit import Kind
from shyped.core.hostfacts import Domain, DomainState
from shyped.core.instances import instance_rules
from shyped.core.labelstore import (
    LabelStoreError,
    resolve_resource,
)
from shyped.core.relabel import RelabelCheck
from shyped.service.config import Mode
from shyped.service.poolstore import PoolUnavailable


class DaemonControlBackend(PolicyOps):
    """`shyped.control.backend.ControlBackend` over a running `shyped.service.daemon.Daemon`."""

    def status(self) -> b.Status:
        states: dict[str, int] = {}
        doms = self.daemon.host.domains()
        for dom in doms:
            states[dom.state.value] = states.get(dom.state.value, 0) + 1
        counts = b.Counts(
            domains=len(doms),
            admitted=states.get("admitted", 0),
            denied=states.get("denied", 0),
            paused=states.get("paused", 0),
            undecided=states.get("seen", 0),
            devices=len(self.daemon.host.devices()),
            vchans=len(self.daemon.host.vchans()),
            vm_labels=len(self._policy.vm_labels),
            resource_labels=len(self._policy.resource_labels),
            labelled_resources=len(self._store.resources),
        )
        return b.Status(
            mode=self.daemon.mode.value,
            policy=self._policy_info(),
            counts=counts,
            ready=self.daemon.ready,
            daemon=f"shyped {__version__} (pid {os.getpid()})",
            quotas=b.quota_rows(self.daemon.quota_table()),
            audit=None if self.daemon.audit is None else self.daemon.audit.state.value,
            vetoes_pending=tuple(b.PendingVeto(**p) for p in self.daemon.pending_vetoes()),
            flask=self._flask_info(),
            pool=None if self.daemon.pool is None else b.PoolStatus(**self.daemon.pool.status()),
            label_store=b.LabelStoreStatus(**self.daemon.label_store_status()),
        )

    def _flask_info(self) -> b.FlaskInfo | None:
        coupling = self.daemon.flask
        if coupling is None:
            return None
        st = coupling.flask.status()
        return b.FlaskInfo(
            mode=st["mode"],
            reason=st["reason"],
            policy_sha256=st["policy_sha256"],
            denials=st["denials"],
            relabels=st["relabels"],
        )

    def placement(self, args: b.PlacementArgs) -> b.PlacementResult:
        """Pool mode: the live hosts where `label` would be admitted now, with reasons."""
        if self.pool_policy is None:
            raise ControlError(ErrorCode.UNAVAILABLE, "placement needs pool mode ([pool])")
        label = views.find_label(self._policy, args.label, "vm").name
        return self.pool_policy.placement(label)

    def attest_quote(self, args: AttestQuoteArgs) -> Deferred[AttestQuote]:
        return attestserve.attest_quote(self.daemon, args)

    def attest_ak(self) -> AttestAk:
        return attestserve.attest_ak(self.daemon)

    def reserve(self, args: b.ReserveArgs) -> Deferred[b.ReserveResult]:
        """Pool mode: the destination's daemon grants or refuses a place (migration, restore)."""
        self._ready()
        if self.reservations is None:
            raise ControlError(ErrorCode.UNAVAILABLE, "reservations need pool mode ([pool])")
        uuid = args.uuid.lower()
        running = next((d for d in self.daemon.host.domains() if (d.uuid or "") == uuid), None)
        label = args.label or self._store.domain_label(uuid, None)
        label = label or (running.label if running is not None else None)
        if label is None:
            raise ControlError(ErrorCode.INVALID_ARGUMENT, f"no label known for UUID {uuid}")
        bare = views.find_label(self._policy, label, "vm").name
        try:
            d = self.reservations.request(uuid, bare, args.host, args.kind)
        except PoolUnavailable as exc:
            raise ControlError(ErrorCode.UNAVAILABLE, str(exc)) from None

        def answer(g: Any) -> b.ReserveResult:
            result = b.ReserveResult(g.id, args.host, g.state.value == "granted", g.reason, bare)
            if not result.granted:
                raise ControlError(
                    ErrorCode.DENIED,
                    f"{args.kind} of {uuid} ({bare}) to {args.host} refused: {g.reason}",
                    {"reasons": [g.reason], "host": args.host},
                )
            return result

        def unavailable(f: Any) -> Any:
            f.trap(PoolUnavailable)
            raise ControlError(ErrorCode.UNAVAILABLE, str(f.value))

        return d.addErrback(unavailable).addCallback(answer)

    def getenforce(self) -> b.EnforceMode:
        return b.EnforceMode(self.daemon.mode.value)

    def setenforce(self, args: b.SetEnforceArgs) -> b.EnforceMode:
        self._ready()
        previous: b.ModeName = self.daemon.mode.value
        self.daemon.set_mode(Mode(args.mode))
        return b.EnforceMode(self.daemon.mode.value, previous)

    def labels(self, args: b.LabelsArgs) -> b.LabelList:
        return views.label_list(self._policy, args.type)

    def validate_label(self, args: b.ValidateLabelArgs) -> b.LabelInfo:
        return views.find_label(self._policy, args.label, args.type)

    def list_domains(self) -> b.DomainList:
        self._ready()
        return b.DomainList(self._domains())

    def get_domain_label(self, args: b.DomainArgs) -> b.DomainInfo:
        self._ready()
        return self._info(self._domain(args.domain))

    def get_resource_label(self, args: b.ResourceArgs) -> b.ResourceInfo:
        rid = self._resource(args.resource)
        return b.ResourceInfo(rid, self._full(self._stored(rid)))

    def resources(self) -> b.ResourceList:
        return b.ResourceList(
            tuple(
                b.ResourceInfo(rid, self._full(label))
                for rid, label in sorted(self._store.resources.items())
            )
        )

    def _domain_label(self, domid: int) -> str | None:
        dom = self.daemon.host.domain(domid)
        return dom.label if dom is not None else None

    def dry_run(self, args: b.DryRunArgs) -> b.DryRunResult:
        self._ready()
        engine = self.daemon.engine
        if args.domain is not None:
            new = args.domain
            if new.label:  # the caller's label must exist: unknown-label, not a denial
                views.find_label(self._policy, new.label, "vm")
            # The label the daemon will decide with: shype-xl registers the cfg's label for
            # the UUID; without one, the store's label by UUID, then by name.
            label = new.label or self._store.domain_label(new.uuid, new.name)
            subject, running = new.name, engine.running
            uuid = new.uuid
        else:
            dom = self._domain(cast(str, args.running))
            label, subject, running = dom.label, dom.name or str(dom.domid), None
            uuid = dom.uuid if engine.instance_of(dom.domid) is not None else None
        narrow = instance_rules(engine.policy, label, uuid, self._store, resolve_resource)
        return views.dry_run(
            engine.policy,
            subject=subject,
            label=label,
            running=running,
            disks=args.disks,
            vifs=args.vifs,
            domain_label=self._domain_label,
            resource_label=lambda rid: self._store.resource_label(resolve_resource(rid)),
            pcis=args.pcis,
            channels=args.channels,
            backend_label=self._backend_label,
            acm_only=args.acm_only,
            narrow=narrow,
        )

    def _backend_label(self, ref: str) -> str | None:
        """A backend domain's label by name, domid or UUID (None: no such domain)."""
        try:
            return self._domain(ref).label
        except ControlError:
            return None

    def register_domain(
        self, args: b.RegisterDomainArgs
    ) -> b.Registration | Deferred[b.Registration]:
        """Label a UUID before its domain is created (None: forget it). A UUID a domain holds
        now (running, or being decided) takes the one path of every label change of a running
        domain: the relabel check (`Daemon.relabel`); it is never forgotten while the domain
        runs, and a domain of another name cannot claim it."""
        self._ready()
        bare = views.find_label(self._policy, args.label, "vm").name if args.label else None
        try:
            store = self._store.with_domain(uuid=args.uuid, label=bare)
        except LabelStoreError as exc:
            raise ControlError(ErrorCode.INVALID_ARGUMENT, str(exc)) from None
        uuid = args.uuid.lower()
        registration = b.Registration(args.uuid.lower(), args.name, self._full(bare))
        holder = self._holder(uuid)
        if holder is None:
            self.forget_decided(uuid)
            self._save(store)
            log.info(
                "control: label of domain {uuid} ({name}) {what}",
                uuid=uuid, name=args.name or "?",
                what=f"registered: {bare}" if bare else "forgotten",
            )  # fmt: skip
            return registration
        who = f"{holder.name or '?'} (domid {holder.domid})"
        refused = f"label {bare or 'none'} for UUID {uuid} denied"
        if args.name is not None and args.name != holder.name:
            why = f"UUID {uuid} is already held by running domain {who}"
        elif bare is None:
            why = f"{who} runs with this UUID: its label is not forgotten while it runs"
        elif bare == holder.label:
            self._save(store)  # what it runs with already: nothing changes
            return registration
        elif holder.state not in _RUNNING:
            why = f"{who} is {holder.state.value}: try again once it is decided"
        else:
            why = ""
        if why or bare is None:
            raise ControlError(ErrorCode.DENIED, refused, {"reasons": [why]})

        def answer(check: RelabelCheck) -> b.Registration:
            if not check.allowed:
                raise ControlError(
                    ErrorCode.DENIED,
                    f"{refused}: relabel of running domain {who} refused "
                    f"({len(check.problems)} reason(s))",
                    {"reasons": list(check.reasons)},
                )
            return registration

        d = self.daemon.relabel(holder.domid, bare, before=lambda: self._save(store))
        return d.addCallback(answer)

    def _holder(self, uuid: str) -> Domain | None:
        """The domain holding `uuid` now: running, or appeared and not decided yet."""
        dom = self.daemon.host.domain_by_uuid(uuid.lower())
        if dom is None or dom.state not in (*_RUNNING, DomainState.SEEN):
            return None
        return dom

    def relabel_domain(self, args: b.RelabelDomainArgs) -> Deferred[b.DomainInfo]:
        self._ready()
        dom = self._domain(args.domain)
        bare = views.find_label(self._policy, args.label, "vm").name
        who = f"{dom.name or '?'} (domid {dom.domid})"
        if dom.state not in _RUNNING:
            raise ControlError(
                ErrorCode.DENIED,
                f"relabel of {who} to {bare} denied",
                {"reasons": [f"{who} is {dom.state.value}: only admitted domains are relabelled"]},
            )
        store = self._store
        if dom.domid == 0:
            # dom0 (xm addlabel L mgt Domain-0): the same checks as any running domain; its
            # label is kept in the store so a restarted daemon keeps it.
            boot = self._policy.bootstrap
            store = store.with_dom0(None if bare == boot else bare)
        elif dom.uuid is not None:
            try:
                store = store.with_domain(uuid=dom.uuid, label=bare)
            except LabelStoreError as exc:  # pragma: no cover - uuid and label were checked
                raise ControlError(ErrorCode.INVALID_ARGUMENT, str(exc)) from None

        def answer(check: RelabelCheck) -> b.DomainInfo:
            if not check.allowed:
                raise ControlError(
                    ErrorCode.DENIED,
                    f"relabel of {who} to {bare} denied ({len(check.problems)} reason(s))",
                    {"reasons": list(check.reasons)},
                )
            now = self.daemon.host.domain(dom.domid)
            return self._info(now if now is not None else dom)

        d = self.daemon.relabel(dom.domid, bare, before=lambda: self._save(store))
        return d.addCallback(answer)

    def set_resource_label(self, args: b.SetResourceLabelArgs) -> b.ResourceLabelChange:
        self._ready()
        rid = self._resource(args.resource)
        bare, stored = (
            views.resource_assignment(self._policy, args.label) if args.label else (None, None)
        )
        previous = self._stored(rid)
        bound = stored.partition("@")[2] or None if stored is not None else None
        check = self.daemon.check_resource_relabel(rid, bare, bound)
        if not check.allowed:
            raise ControlError(
                ErrorCode.DENIED,
                f"label {bare or 'none'} for {rid} denied: it is in use",
                {"reasons": list(check.reasons)},
            )
        self._save(self._store.with_resource(rid, stored))
        self._record(Kind.RESOURCE_LABEL, resource=rid, old=previous, new=stored)
        log.info(
            "control: resource {rid}: {old} -> {new}", rid=rid, old=previous, new=stored or "-"
        )
        return b.ResourceLabelChange(rid, self._full(stored), self._full(previous))

    def _stored(self, rid: str) -> str | None:
        """A resource's label as stored: ``<label>`` or ``<label>@<uuid>`` (an instance's)."""
        name, uuid = self._store.resource_binding(rid)
        return name if uuid is None or name is None else f"{name}@{uuid}"

    def forget_domain(self, args: b.DomainArgs) -> b.Forgotten:
        """``xm rmlabel mgt``: drop a stored domain label (by UUID, else by name) unless a
        domain of that UUID or name runs (its label changes only through a relabel)."""
        self._ready()
        ref = args.domain
        try:
            running = views.match_domain(ref, self._domains())
        except ControlError as exc:
            if exc.code != ErrorCode.NOT_FOUND:
                raise
        else:
            raise ControlError(
                ErrorCode.DENIED,
                f"label of {ref[:80]!r} not removed",
                {"reasons": [
                    f"{running.name or '?'} (domid {running.domid}) runs: a running domain keeps "
                    "a label (relabel it with addlabel LABEL mgt DOMAIN)"
                ]},
            )  # fmt: skip
        store = self._store
        try:
            if views.is_uuid(ref):
                uuid = ref.lower()
                old_uuid, old_name = store.by_uuid.get(uuid), None
                new = store.with_domain(uuid=uuid, label=None)
            else:
                old_uuid, old_name = None, store.by_name.get(ref)
                new = store.with_domain(name=ref, label=None)
        except LabelStoreError as exc:
            raise ControlError(ErrorCode.INVALID_ARGUMENT, str(exc)[:300]) from None
        if old_uuid is None and old_name is None:
            raise ControlError(ErrorCode.NOT_FOUND, f"domain {ref[:80]!r} has no stored label")
        self._save(new)
        return b.Forgotten(ref, self._full(old_uuid), self._full(old_name))

    def audit(self, event: b.ControlAudit) -> None:
        if event.count is not None:  # a summary of refusals: the server already logged it
            self._record(
                Kind.CONTROL_REFUSALS,
                uid=event.peer.uid,
                gid=event.peer.gid,
                kinds=event.op,
                count=event.count,
                summary=event.summary,
            )
            return
        self._record(
            Kind.CONTROL,
            op=event.op,
            uid=event.peer.uid,
            gid=event.peer.gid,
            pid=event.peer.pid,
            allowed=event.allowed,
            code=event.code,
            summary=event.summary,
        )
        log.info(
            "control: {op} by uid {uid} (pid {pid}) {verdict}: {summary}",
            op=event.op,
            uid=event.peer.uid,
            pid=event.peer.pid,
            verdict="done" if event.allowed and event.code is None else (event.code or "refused"),
            summary=event.summary,
        )
        for hook in list(self.audit_hooks):
            try:
                hook(event)
            except Exception:
                log.failure("control audit hook {h!r} raised", h=hook)


__all__ = [
    "CFG_DEVICE_KINDS",
    "WAIT_RECHECK",
    "DaemonControlBackend",
]
