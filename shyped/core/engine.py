"""The decision engine: a question from the host model in, a decision and its actions out.

Pure (no I/O, no reactor): `Engine.decide` takes a `shyped.core.hostfacts.NeedsDecision` and the
`shyped.core.host.HostModel` it came from and returns an `Outcome`: the policy's `Decision`, every
check that was made, the parties (as audit `Party` values), and the `shyped.core.actions` to carry
out. The daemon records the outcome in the host model, tells its listeners, and hands the
actions to the enforcer.

Per hook (DESIGN.md §1):

* **domain**: the label is looked up in the label store (UUID first, then name); a domain
  without one is "unlabelled" and the policy's ``[defaults] unlabelled_domain`` decides (a
  label name, or deny). Admission is the Chinese Wall check of `RunningSet`; an admitted domain
  is counted, and its label is published (`WriteLabel`). Veto: `VetoDomain` (destroy, or pause
  with ``domain_veto = "pause"``).
* **device**: STE between the frontend's and the backend's labels (`Hook.DEVICE_CHANNEL`), then,
  if the device uses a resource, the resource's label (label store: ``disk:<params>`` for a
  vbd, ``bridge:<name>`` for a vif) against the frontend's label (`PolicyEngine.resource`,
  writable unless the vbd is read-only; ``pci:SSSS:BB:DD.F`` for a passed-through PCI device).
  Veto: `CutDevice`; for a device the guest also has outside the PV handshake (``emulated``:
  an HVM guest's disks and emulated NICs, PCI passthrough) the frontend's `VetoDomain`.
* **vchan**: STE between the server and every *present* named client. A rendezvous readable by
  every domain is denied outright: any domain could connect, so no STE check can stand for it.
  Clients that do not exist yet are asked about again when they appear (the host model does
  that). Quotas (``max_vchans`` …) are checked for the server and for every present named
  client: a rendezvous counts for both ends. Veto: `RemoveVchan`.
* **channel** (``xs-channel``, `shyped.core.channels`): a guest-owned node another guest may read or
  write, whatever it is called. STE (and MLS: equal labels, as any two-way channel) between
  the owner and every present named domain; readable by every domain: denied outright. Veto:
  `ResetPerms` (owner only). A node past the tracking bound is denied (rule ``quota``) and
  removed (`RemoveNode`).
* **Denied domains** (fail closed): a device, vchan or channel one of whose parties is a
  domain denied admission (its veto carried out or still pending) is denied (rule
  ``denied-domain``), whatever STE says; it is decided again when that changes.

Modes: in ``permissive`` nothing is vetoed (the vetoes are still computed, as
`Outcome.planned`), and a denied domain that keeps running still counts in the Chinese Wall
running set when its label resolves, because it *is* running: a domain that conflicts with it
is denied too (docs/operations.md). Labels are published in both modes.
"""

from __future__ import annotations

from typing import cast

import attrs

from shyped.core import quota
from shyped.core.accounting import HOOK_OF_KIND, account_domain
from shyped.core.actions import (
    Action,
    RemoveNode,
    RemoveVchan,
    ResetPerms,
    VetoDomain,
    WriteLabel,
)
from shyped.core.audit import Party
from shyped.core.channels import ChannelKey
from shyped.core.devicekinds import unknown_kind
from shyped.core.enginestate import EngineState
from shyped.core.events import DeviceKey
from shyped.core.host import HostModel
from shyped.core.hostfacts import DomainReleased, DomainState, NeedsDecision, VchanKey
from shyped.core.modes import DomainVeto, Mode
from shyped.core.outcome import (
    Outcome,
    describe_party,
    resource_of,
)
from shyped.core.running import (
    _invalid_resource,
    adapt_running_system,
)
from shyped.core.vetoes import denied_party, exemption, veto_for
from shyped.policy.chinese_wall import NotRunningError, running_set
from shyped.policy.decisions import Decision, Hook, Rule, UnknownLabelError
from shyped.policy.instances import instance_resource

_UNDECIDED = frozenset({DomainState.SEEN, DomainState.GONE})
#: Quotas re-checked when a running domain's account changes (`Engine.recheck_quota`).
_RECHECKED = (
    quota.QuotaKind.MEMORY,
    quota.QuotaKind.VCPUS,
    quota.QuotaKind.EVENT_CHANNELS,
    quota.QuotaKind.GRANT_REFS,
)


class Engine(EngineState):
    """Decisions under one policy, label store and mode; holds the Chinese Wall count."""

    # ---- decisions ----------------------------------------------------------------------

    def decide(self, need: NeedsDecision, host: HostModel) -> Outcome:
        """Decide one question from `host` (which must be the model that asked it)."""
        if need.kind == "domain":
            return self._domain(need, host)
        if need.kind == "device":
            return self._device(need, host)
        if need.kind == "channel":
            return self._channel(need, host)
        return self._vchan(need, host)

    def release(self, released: DomainReleased) -> str | None:
        """A domain is gone: uncount it. Returns the label it was counted with, if any."""
        self._instances.release(released.domid)
        label = self._counted.pop(released.domid, None)
        if label is not None:
            try:
                self._running.stop(label)
            except (NotRunningError, UnknownLabelError):  # pragma: no cover - model out of step
                self._rebuild()
        return label

    def _outcome(
        self,
        need: NeedsDecision,
        what: str,
        checks: list[Decision],
        veto: Action,
        *,
        subject: Party,
        exempt: str = "",
        peer: Party | None = None,
        clients: tuple[Party, ...] = (),
        resource: Party | None = None,
        label: str | None = None,
        published: tuple[Action, ...] = (),
    ) -> Outcome:
        """The deciding check is the first denial, else the last permit; a denial plans
        `veto`, carried out when enforcing unless `exempt` says why not."""
        decision = next((c for c in checks if not c.permitted), checks[-1])
        actions: tuple[Action, ...] = published
        planned: tuple[Action, ...] = ()
        note = ""
        if not decision.permitted:
            planned = (veto,)
            if self.mode is Mode.PERMISSIVE:
                note = "permissive: not enforced"
            elif exempt:
                note = exempt
            else:
                actions = (*actions, veto)
        return Outcome(
            need,
            what,
            decision,
            tuple(checks),
            subject,
            self.mode,
            self._policy.policy.name,
            peer=peer,
            clients=clients,
            resource=resource,
            label=label,
            actions=actions,
            planned=planned,
            note=note,
        )

    def _domain(self, need: NeedsDecision, host: HostModel) -> Outcome:
        domid = cast(int, need.key)
        previous = self._counted.pop(domid, None)
        if previous is not None:
            # Asked again (sweep): decide against the others, with the label it runs with.
            self._running.stop(previous)
            raw: str | None = previous
        else:
            raw = self._published.pop(domid, None) or self.labels.domain_label(need.uuid, need.name)
        # Places held for incoming domains count for new admissions, not for a running
        # domain asked again (sweep); not the holder's own, nor one whose domain is here.
        uid = (need.uuid or "").lower()
        held = [
            lb
            for u, lb in (self.held.items() if previous is None else ())
            if u != uid and host.domain_by_uuid(u) is None
        ]
        decision = self._running.admit(raw)
        if decision.permitted and held:
            decision = self._admit_with_held(raw, held)
        name = self._resolve(raw)
        checks = [decision]
        if decision.permitted and name is not None and self._has_quota(name):
            others = self._others_counted(name, domid) + held.count(name)
            checks = self._with_quota(checks, host, domid, name, Hook.DOMAIN_ADMIT, others)
        inst, clash = self._instances.admission(self._policy.policy, domid, name, need.uuid)
        if clash is not None and all(c.permitted for c in checks):
            checks.append(clash)
        allowed = all(c.permitted for c in checks)
        published: tuple[Action, ...] = ()
        self._instances.release(domid)
        if name is not None and (allowed or self.mode is Mode.PERMISSIVE):
            self._running.start(name)
            self._counted[domid] = name
            if self._swept is not None:
                self._swept.add(domid)
            published = (WriteLabel(domid, need.uuid, self.label_string(name)),)
            if inst is not None and clash is None:
                self._instances.claim(domid, inst)
        recorded = name if name is not None else raw
        shown = inst.name if inst is not None and clash is None else None
        return self._outcome(
            need,
            f"domain {domid}",
            checks,
            VetoDomain(domid, self.domain_veto),
            subject=Party(
                name=need.name, domid=domid, uuid=need.uuid, label=recorded, instance=shown
            ),
            label=recorded,
            published=published,
        )

    def _device(self, need: NeedsDecision, host: HostModel) -> Outcome:
        key = cast(DeviceKey, need.key)
        fe, be = need.domid, need.peers[0]
        fe_dom, be_dom = host.domain(fe), host.domain(be)
        fe_label = fe_dom.label if fe_dom is not None else None
        be_label = be_dom.label if be_dom is not None else None
        denied = denied_party(Hook.DEVICE_CHANNEL, host, (fe, be), fe_label)
        checks = [denied or self._policy.channel(Hook.DEVICE_CHANNEL, fe_label, be_label)]
        unknown = unknown_kind(key.kind, need.resource.resource if need.resource else None)
        if unknown is not None and checks[0].permitted:
            checks.append(unknown)
        res_party = None
        if need.resource is not None:
            use = need.resource
            rid = resource_of(key.kind, use.resource)
            if rid is not None:
                rid = self.resolve(rid)
            rlabel, bound = self.labels.resource_binding(rid) if rid is not None else (None, None)
            shown = rlabel if bound is None else f"{rlabel}@{bound}"
            res_party = Party(resource=rid or use.resource[:200], label=shown)
            if checks[0].permitted:
                if rid is None:  # never "unlabelled": an id we cannot read is denied
                    checks.append(_invalid_resource(use.resource))
                else:
                    base = self._policy.resource(fe_label, rlabel, writable=use.writable)
                    inst = self._instances.get(fe)
                    uuid = inst.uuid if inst is not None else None
                    checks.append(
                        instance_resource(
                            self._policy.policy, base, bound_to=bound, domain_uuid=uuid
                        )
                    )
        if all(c.permitted for c in checks) and fe_dom is not None:
            checks = self._with_quota(checks, host, fe, fe_label, Hook.DEVICE_CHANNEL)
        veto, _ = veto_for(need, host, self.domain_veto)
        return self._outcome(
            need,
            f"device {key.kind} {fe}/{key.devid}",
            checks,
            veto,
            exempt=exemption(host, fe, "frontend", self.domain_veto),
            subject=self._party(fe_dom, fe),
            peer=self._party(be_dom, be),
            resource=res_party,
        )

    def _vchan(self, need: NeedsDecision, host: HostModel) -> Outcome:
        key = cast(VchanKey, need.key)
        server = need.domid
        sdom = host.domain(server)
        s_label = sdom.label if sdom is not None else None
        clients = tuple(self._party(host.domain(c), c) for c in need.peers)
        checks, peer = self._pair_checks(
            Hook.VCHAN,
            need,
            host,
            s_label,
            anyone="the rendezvous is readable by every domain: any domain could connect, so "
            "no STE check can stand for it (grant read to the client only)",
            nobody="no named client exists yet (decided again when one appears)",
        )
        if all(c.permitted for c in checks) and sdom is not None:
            checks = self._with_quota(checks, host, server, s_label, Hook.VCHAN)
        for c in need.peers:  # a rendezvous counts against its clients' quotas too
            cdom = host.domain(c)
            if not all(x.permitted for x in checks):
                break
            if cdom is not None and cdom.state not in _UNDECIDED and c != 0:
                checks = self._with_quota(checks, host, c, cdom.label, Hook.VCHAN)
                if not checks[-1].permitted:
                    peer = self._party(cdom, c)
        return self._outcome(
            need,
            f"vchan {key.path}",
            checks,
            RemoveVchan(server, key.path),
            exempt=exemption(host, server, "server", self.domain_veto),
            subject=self._party(sdom, server),
            peer=peer,
            clients=clients,
        )

    def _pair_checks(
        self,
        hook: Hook,
        need: NeedsDecision,
        host: HostModel,
        label: str | None,
        *,
        anyone: str,
        nobody: str,
    ) -> tuple[list[Decision], Party | None]:
        """The checks between `need.domid` (labelled `label`) and each present, decided peer:
        denied outright if a party is a denied domain or every domain may connect; else the
        policy's channel decision per peer up to the first denial (`nobody` permits when no
        named peer exists yet). Returns the checks and the peer that decided."""
        denied = denied_party(hook, host, (need.domid, *need.peers), label)
        if denied is not None:
            return [denied], None
        if need.any_peer:
            return [Decision(False, hook, Rule.STE, anyone, label)], None
        checks: list[Decision] = []
        peer: Party | None = None
        for c in need.peers:
            cdom = host.domain(c)
            if cdom is None or cdom.state in _UNDECIDED:
                continue
            d = self._policy.channel(hook, label, cdom.label)
            checks.append(d)
            if peer is None or not d.permitted:
                peer = self._party(cdom, c)
            if not d.permitted:
                break
        if not checks:
            checks.append(Decision(True, hook, Rule.STE, nobody, label))
        return checks, peer

    def _channel(self, need: NeedsDecision, host: HostModel) -> Outcome:
        key = cast(ChannelKey, need.key)
        owner = need.domid
        odom = host.domain(owner)
        o_label = odom.label if odom is not None else None
        peers = tuple(self._party(host.domain(c), c) for c in need.peers)
        veto: Action = ResetPerms(owner, key.path)
        if need.over_limit:
            veto = RemoveNode(owner, key.path)
            reason = (
                f"domain {owner} has more shared or rendezvous nodes than the daemon tracks: "
                "denied and removed (fail closed)"
            )
            checks, peer = [Decision(False, Hook.XS_CHANNEL, Rule.QUOTA, reason, o_label)], None
        else:
            checks, peer = self._pair_checks(
                Hook.XS_CHANNEL,
                need,
                host,
                o_label,
                anyone="the node is reachable by every domain: no STE check can stand for it "
                "(name the peer in its permissions)",
                nobody="no named domain exists yet (decided again when one appears)",
            )
        return self._outcome(
            need,
            f"xs-channel {key.path}",
            checks,
            veto,
            subject=self._party(odom, owner),
            peer=peer,
            clients=peers,
        )

    # ---- quotas -------------------------------------------------------------------------

    def _with_quota(
        self,
        checks: list[Decision],
        host: HostModel,
        domid: int,
        label: str | None,
        hook: Hook,
        others: int | None = None,
    ) -> list[Decision]:
        """`checks` (all permits) and, if it denies, the quota check of `domid` under `label`
        at `hook` (it then decides). A permitting quota check is not listed: the policy's
        check reports the permit."""
        name = self._resolve(label)
        if name is None or not self._has_quota(name):
            return checks  # no quota: no account (dom0's spans every backend device)
        account = account_domain(host, domid)
        if account is None:
            return checks
        q = quota.check(self._policy.policy, name, account, hook=hook, others_running=others)
        return checks if q.permitted else [*checks, q]

    def _has_quota(self, label: str) -> bool:
        """Whether the VM label carries any quota: only then is an account worth computing
        (a quota-free label, like dom0's, skips the O(devices) account on the hot path)."""
        vm = self._policy.policy.vm_label(label)
        return vm is not None and not vm.quota.is_unlimited

    def _admit_with_held(self, raw: str | None, held: list[str]) -> Decision:
        """The Chinese Wall check of `raw` with the `held` places counted as running."""
        labels = [n for n, c in self._running.running_labels().items() for _ in range(c)]
        try:
            decision = running_set(self._policy, [*labels, *held]).admit(raw)
        except UnknownLabelError:  # a held label the policy no longer knows: fail closed
            return attrs.evolve(
                self._running.admit(raw), permitted=False, reason="a held place has no label"
            )
        if decision.permitted:
            return decision
        why = f"{decision.reason} (counting {len(held)} place(s) held for incoming domains)"
        return attrs.evolve(decision, reason=why)

    def _others_counted(self, label: str, domid: int) -> int:
        """Running domains counted with `label` besides `domid` (for max_domains). During a
        sweep only those re-admitted so far: the first comers keep their place, as in the
        Chinese Wall replay, and a lowered max_domains refuses the later ones only."""
        ids = self._counted.with_label(label)
        if self._swept is None:
            return len(ids) - (domid in ids)
        swept = self._swept
        return sum(1 for d in ids if d != domid and d in swept)

    def recheck_quota(self, domid: int, host: HostModel) -> Outcome | None:
        """A running, admitted domain whose account changed (sizes written after admission,
        rings published): a domain veto with rule ``quota`` if it now exceeds a per-domain
        quota of its label (memory, vCPUs, event channels, grant refs; devices and vchans are
        checked at their own hooks), else None."""
        dom = host.domain(domid)
        if dom is None or dom.state is not DomainState.ADMITTED or domid == 0:
            return None
        name = self._resolve(dom.label)
        if name is None or not self._has_quota(name):
            return None
        account = account_domain(host, domid)
        if account is None:
            return None
        q = quota.check(
            self._policy.policy, name, account, hook=Hook.DOMAIN_ADMIT, kinds=_RECHECKED
        )
        if q.permitted:
            return None
        if self.mode is Mode.ENFORCING and self._counted.get(domid) is not None:
            self._running.stop(self._counted.pop(domid))
        need = NeedsDecision(
            "domain", domid, domid, uuid=dom.uuid, name=dom.name, facts=(dom.uuid,)
        )
        return self._outcome(
            need,
            f"domain {domid}",
            [q],
            VetoDomain(domid, self.domain_veto),
            subject=self._party(dom, domid),
            label=name,
        )

    def runtime_veto(self, breach: quota.RuntimeBreach, host: HostModel) -> Outcome | None:
        """A run-time quota breach (`shyped.core.quota.RuntimeQuotas`) as a denying outcome on
        the label's top consumer, planning a **pause** (not the configured domain veto: the
        breach may be transient, a paused domain loses nothing and ``xl unpause`` resumes it);
        None if that domain is no longer an admitted one."""
        dom = host.domain(breach.domid)
        if dom is None or dom.state is not DomainState.ADMITTED or breach.domid == 0:
            return None
        need = NeedsDecision(
            "domain", breach.domid, breach.domid, uuid=dom.uuid, name=dom.name, facts=(dom.uuid,)
        )
        return self._outcome(
            need,
            f"domain {breach.domid}",
            [breach.decision],
            VetoDomain(breach.domid, DomainVeto.PAUSE),
            subject=self._party(dom, breach.domid),
            label=breach.label,
        )

    def refuse(self, need: NeedsDecision, host: HostModel, rule: Rule, reason: str) -> Outcome:
        """Deny `need` without asking the policy (the audit trail cannot record it:
        fail-closed); the veto is the hook's usual one. Nothing is counted."""
        hook = HOOK_OF_KIND[need.kind]
        dom = host.domain(need.domid)
        subject = self._party(dom, need.domid)
        if need.kind == "domain":
            subject = Party(name=need.name, domid=need.domid, uuid=need.uuid)
        d = Decision(False, hook, rule, reason, subject.label)
        if need.kind == "domain":
            self._instances.release(need.domid)
            if self._counted.pop(need.domid, None) is not None:
                self._rebuild()
        veto, what = veto_for(need, host, self.domain_veto)
        return self._outcome(need, what, [d], veto, subject=subject)


__all__ = [
    "Engine",
    "Outcome",
    "adapt_running_system",
    "describe_party",
    "resource_of",
]
