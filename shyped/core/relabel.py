"""May a running domain, or a resource in use, take another label now? Pure; no I/O.

Xen ACM relabelled a running domain in two steps (``RELEASE-4.1.0``):
``tools/python/xen/xend/XendDomainInfo.py`` ``set_security_label`` first checked that every
resource the domain uses is accessible under the new label
(``resources_compatible_with_vmlabel``), then the hypervisor's ``do_acm_relabel_doms``
(``xen/xsm/acm/acm_policy.c``) gave the domain its new ssidref and re-ran
``chwall_init_state`` and ``ste_init_state`` over every running domain: a Chinese Wall
conflict, or a live event channel or grant whose two ends no longer share a type, restored the
old ssidref and refused. `check_domain_relabel` is that check on the daemon's running system:

- the Chinese Wall, as if the domain were started now with the new label against all the
  other running domains (its old label no longer counts);
- every live channel the domain is an end of (PV devices, vchans), with the full channel rule
  of the policy (STE, and MLS where both ends carry a level);
- every resource the domain uses (disk images, bridges), read-only or not;
- a dynamic label (docs/policy.md) is neither given nor taken away: a domain becomes an
  instance at admission only.

Every reason is reported, not just the first. Nothing here changes anything: the daemon applies
the relabel only when the check allows it.

Resources: ACM's ``acm.py`` ``set_resource_label`` refused *any* change to the label of a
resource in use (``XSERR_RESOURCE_IN_USE``). `check_resource_relabel` refuses only a change
that would deny a current use: labelling a bridge that running domains use with a label they
may use is allowed (docs/control-protocol.md).
"""

from __future__ import annotations

from collections.abc import Callable

import attrs

from shyped.policy.chinese_wall import running_set
from shyped.policy.decisions import Decision, Hook, PolicyEngine, UnknownLabelError
from shyped.policy.instances import instance_resource
from shyped.policy.update import Reason, RunningDomain, RunningSystem, UpdateProblem


@attrs.frozen
class RelabelCheck:
    """The verdict on giving `subject` (a domid or a resource id) the label `new`.

    `old`/`new` are label names of the active policy (None: unlabelled). `problems` says
    every reason the relabel is refused; empty when allowed.
    """

    subject: int | str
    old: str | None
    new: str | None
    problems: tuple[UpdateProblem, ...] = ()

    @property
    def allowed(self) -> bool:
        return not self.problems

    @property
    def reasons(self) -> tuple[str, ...]:
        return tuple(str(p) for p in self.problems)


def _why(d: Decision) -> str:
    return f"{d.reason} [{d.rule}]"


def _is_dynamic(engine: PolicyEngine, name: str) -> bool:
    vm = engine.policy.vm_label(name)
    return vm is not None and vm.dynamic


def _label_name(label: object) -> str | None:
    return None if label is None else str(label)


def check_domain_relabel(
    engine: PolicyEngine, system: RunningSystem, domid: int, label: str
) -> RelabelCheck:
    """May running domain `domid` be relabelled `label` (a VM label of `engine`'s policy)?

    `system` is the running system with every domain under its *current* label (as the daemon
    builds it for policy updates): the domains, the live channels between them, and the
    resources they use with the resources' labels.
    """
    domains = {d.domid: d for d in system.domains}
    me = domains.get(domid)
    if me is None:
        problem = UpdateProblem(
            Reason.LABEL,
            f"domain {domid} is not running (only admitted domains can be relabelled)",
            (domid,),
        )
        return RelabelCheck(domid, None, label, (problem,))
    old = _label_name(me.label)
    who = me.describe()
    try:
        new = engine.resolve_domain(label).name
    except UnknownLabelError as e:
        problem = UpdateProblem(Reason.LABEL, f"{who}: {e.reason}", (domid,), (label,))
        return RelabelCheck(domid, old, label, (problem,))

    problems: list[UpdateProblem] = []
    dynamic = [n for n in (old, new) if n is not None and _is_dynamic(engine, n)]
    if dynamic and old != new:
        problems.append(
            UpdateProblem(
                Reason.LABEL,
                f"{who}: {dynamic[0]!r} is a dynamic label: a domain becomes an instance at "
                "admission only (restart it with the new label)",
                (domid,),
                (new,),
            )
        )
    others = [d.label for d in system.domains if d.domid != domid]
    admission = running_set(engine, others).admit(new)
    if not admission.permitted:
        problems.append(
            UpdateProblem(
                Reason.CHINESE_WALL,
                f"{who} relabelled {new!r}: {_why(admission)}",
                (domid,),
                (new,),
            )
        )

    def label_of(d: int) -> str | None:
        return new if d == domid else _label_name(domains[d].label)

    for i, c in enumerate(system.channels):
        if domid not in (c.dom_a, c.dom_b):
            continue
        a, b = label_of(c.dom_a), label_of(c.dom_b)
        if c.hook is Hook.GRANT:
            dec = engine.grant(a, b, writable=c.writable)
        else:
            dec = engine.channel(c.hook, a, b)
        if not dec.permitted:
            problems.append(
                UpdateProblem(
                    Reason.CHANNEL,
                    f"live {c.kind} channel between {_describe(domains, c.dom_a)} and "
                    f"{_describe(domains, c.dom_b)}: {_why(dec)}",
                    (c.dom_a, c.dom_b),
                    index=i,
                )
            )

    for i, r in enumerate(system.resources):
        if r.domid != domid:
            continue
        dec = engine.resource(new, r.label, writable=r.writable)
        if not dec.permitted:
            what = f"resource {r.resource!r}" if r.resource else "resource"
            problems.append(
                UpdateProblem(
                    Reason.RESOURCE, f"{what} used by {who}: {_why(dec)}", (domid,), index=i
                )
            )
    return RelabelCheck(domid, old, new, tuple(problems))


def check_resource_relabel(
    engine: PolicyEngine,
    system: RunningSystem,
    resource: str,
    label: str | None,
    *,
    bound_to: str | None = None,
    instance_uuid: Callable[[int], str | None] = lambda _: None,
) -> RelabelCheck:
    """May `resource` (a label store resource id) be labelled `label` (None: unlabelled),
    assigned to the instance of the domain with UUID `bound_to` if given?

    Refused when a running domain uses it and the new label would deny that use (with the
    instance rules of `shyped.policy.instances`: `instance_uuid(domid)` is the UUID of the
    instance a domain runs as, None if it runs as none).
    """
    domains = {d.domid: d for d in system.domains}
    uses = [(i, r) for i, r in enumerate(system.resources) if r.resource == resource]
    old = _label_name(uses[0][1].label) if uses else None
    problems: list[UpdateProblem] = []
    for i, r in uses:
        dec = engine.resource(domains[r.domid].label, label, writable=r.writable)
        uuid = instance_uuid(r.domid)
        dec = instance_resource(engine.policy, dec, bound_to=bound_to, domain_uuid=uuid)
        if not dec.permitted:
            mode = "read-write" if r.writable else "read-only"
            problems.append(
                UpdateProblem(
                    Reason.RESOURCE,
                    f"resource {resource!r} is in use ({mode}) by "
                    f"{_describe(domains, r.domid)}: {_why(dec)}",
                    (r.domid,),
                    index=i,
                )
            )
    return RelabelCheck(resource, old, label, tuple(problems))


def _describe(domains: dict[int, RunningDomain], domid: int) -> str:
    d = domains.get(domid)
    return d.describe() if d is not None else f"domain {domid}"
