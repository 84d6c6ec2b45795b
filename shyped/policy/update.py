"""Policy update check: may a new policy replace the current one on a running system?

A new policy replaces the current one only if the running system already satisfies it; the
answer lists *every* reason it does not, and the label maps the daemon applies if it does.
This follows Xen ACM's update path (Xen ``RELEASE-4.1.0``):

- ``tools/python/xen/util/acmpolicy.py`` ``ACMPolicy.update`` / ``__do_update_version_check``:
  the new policy's ``FromPolicy`` must name the current policy's name *and* version, and its
  own version must be greater (``isVersionUpdate`` compares ``(major, minor)``). Labels the
  new policy renames with ``from=`` are followed; a ``from=`` naming a label the current
  policy does not have is a "bad renaming" and refuses the update.
- ``tools/python/xen/util/xsm/acm/acm.py`` ``change_acm_policy``: every running domain is
  relabelled through the rename map; a running domain whose label disappears refuses the
  update, and so does a domain that could no longer use its resources.
- ``xen/xsm/acm/acm_policy.c`` ``_acm_update_policy``: no running domain may use a deleted
  label (``acm_check_deleted_ssidrefs``); then ``chwall_init_state`` (Chinese Wall: replay
  all running domains as if started now, any conflict refuses) and ``ste_init_state`` (every
  live event channel and grant mapping between two domains must still share a type).

Differences, chosen and documented (docs/policy-update.md):

- ACM stopped at the first violation; we report all of them. Chinese Wall conflicts are
  reported per pair of labels (with all domains involved), not per domain pair, so the list
  stays short on big hosts.
- ``from=`` wins: if a new label says ``from="X"``, domains labelled X get that label even if
  the new policy also has a (different) label called X. ACM's tools and hypervisor disagreed
  on this case; here it is one rule.
- Channels and resources are checked with the full decision rules of `PolicyEngine` under the
  new policy (STE, and MLS where both sides carry an MLS label), not STE alone.
- A channel or resource whose domain's label does not survive is not checked again: the
  label problem already refuses the update and says why.

Everything here is pure: the running system is plain data (`RunningSystem`), produced by the
daemon from its host model.
"""

from __future__ import annotations

import enum
from collections import defaultdict
from collections.abc import Iterable, Mapping
from typing import Final

import attrs

from shyped.policy.acm_default import is_default_policy
from shyped.policy.decisions import Decision, Hook, PolicyEngine, UnknownLabelError, fmt_names
from shyped.policy.errors import LabelSyntaxError
from shyped.policy.model import LabelRef, Policy, PolicyRef, VmLabel

#: Channel kinds that are not PV device kinds (the rest, ``vbd``, ``vif``, ``console`` ...,
#: are checked as device channels between frontend and backend).
_KIND_HOOKS: Final = {
    "vchan": Hook.VCHAN,
    "xs-channel": Hook.XS_CHANNEL,
    "evtchn": Hook.EVTCHN,
    "grant": Hook.GRANT,
}

LabelSpec = str | LabelRef | None


# --------------------------------------------------------------------------- the input


@attrs.frozen
class RunningDomain:
    """A running (or paused) domain and its label under the *current* policy.

    `label` is a VM label name of the current policy, an ``ACM:<policy>:<label>`` string or
    `LabelRef` (its policy must be the current one), or None for an unlabelled domain (the
    policies' defaults apply).
    """

    domid: int
    label: LabelSpec
    name: str | None = None

    def describe(self) -> str:
        return f"domain {self.name!r} ({self.domid})" if self.name else f"domain {self.domid}"


@attrs.frozen
class LiveChannel:
    """A channel between two running domains.

    `kind`: a PV device kind (``vbd``, ``vif``, ``console`` ...: frontend `dom_a`, backend
    `dom_b`), ``vchan`` (server, client), ``evtchn``, or ``grant`` (mapper `dom_a` maps a
    page granted by `dom_b`; `writable` says how).
    """

    dom_a: int
    dom_b: int
    kind: str
    writable: bool = True

    @property
    def hook(self) -> Hook:
        return _KIND_HOOKS.get(self.kind, Hook.DEVICE_CHANNEL)


@attrs.frozen
class ResourceInUse:
    """A resource a running domain uses, with the resource's label under the current policy.

    `label` as for `RunningDomain` (a resource label; None: unlabelled). `resource` names the
    resource in messages (a disk image path, a bridge).
    """

    domid: int
    label: LabelSpec
    writable: bool
    resource: str = ""


def _domains(items: Iterable[RunningDomain]) -> tuple[RunningDomain, ...]:
    return tuple(items)


def _channels(items: Iterable[LiveChannel]) -> tuple[LiveChannel, ...]:
    return tuple(items)


def _resources(items: Iterable[ResourceInUse]) -> tuple[ResourceInUse, ...]:
    return tuple(items)


@attrs.frozen
class RunningSystem:
    """The domains, channels and resources a new policy must accept.

    Every domid a channel or resource names must be one of `domains`, and domids are unique:
    the constructor raises ValueError otherwise (the caller's model is broken, not the policy).
    """

    domains: tuple[RunningDomain, ...] = attrs.field(converter=_domains, default=())
    channels: tuple[LiveChannel, ...] = attrs.field(converter=_channels, default=())
    resources: tuple[ResourceInUse, ...] = attrs.field(converter=_resources, default=())

    def __attrs_post_init__(self) -> None:
        seen: set[int] = set()
        for d in self.domains:
            if d.domid in seen:
                raise ValueError(f"domid {d.domid} appears twice in the running system")
            seen.add(d.domid)
        for c in self.channels:
            for domid in (c.dom_a, c.dom_b):
                if domid not in seen:
                    raise ValueError(f"channel {c} names domid {domid}, which is not running")
        for r in self.resources:
            if r.domid not in seen:
                raise ValueError(f"resource use {r} names domid {r.domid}, which is not running")


# --------------------------------------------------------------------------- the answer


class Reason(enum.StrEnum):
    """Why an update is refused."""

    FROM_POLICY = "from-policy"  #: FromPolicy missing or not naming the current policy
    VERSION = "version"  #: the new version is not greater than the current one
    BAD_RENAME = "bad-rename"  #: a from= names no label of the current policy
    LABEL = "label"  #: a running domain's label is deleted (or unknown, or unlabelled denied)
    CHINESE_WALL = "chinese-wall"  #: running domains whose labels would conflict
    CHANNEL = "channel"  #: a live channel the new policy would deny
    RESOURCE = "resource"  #: a resource in use the new policy would deny


@attrs.frozen
class UpdateProblem:
    """One reason an update is refused.

    `domains`: the domids concerned; `labels`: the label names concerned (current-policy
    names, except for Chinese Wall conflicts which name new-policy labels); `index`: the
    position of the channel or resource use in the `RunningSystem`.
    """

    reason: Reason
    message: str
    domains: tuple[int, ...] = ()
    labels: tuple[str, ...] = ()
    index: int | None = None

    @property
    def key(self) -> tuple[Reason, tuple[int, ...], tuple[str, ...], int | None]:
        """What the problem is about, without the wording (for comparisons)."""
        return (self.reason, self.domains, self.labels, self.index)

    def __str__(self) -> str:
        return f"[{self.reason}] {self.message}"


@attrs.frozen
class LabelMaps:
    """How the current policy's labels carry over into the new one (``from=`` followed).

    `vm`/`resource`: current label name -> new label name, for every label that survives
    (renamed or kept under its name). `vm_deleted`/`resource_deleted`: current labels with no
    counterpart. `bad_vm_renames`/`bad_resource_renames`: ``from=`` names (new label ->
    from name) that are not labels of the current policy.
    """

    vm: Mapping[str, str]
    resource: Mapping[str, str]
    vm_deleted: frozenset[str]
    resource_deleted: frozenset[str]
    bad_vm_renames: Mapping[str, str]
    bad_resource_renames: Mapping[str, str]

    @property
    def vm_renames(self) -> dict[str, str]:
        """Only the VM labels whose name changes."""
        return {o: n for o, n in self.vm.items() if o != n}

    @property
    def resource_renames(self) -> dict[str, str]:
        """Only the resource labels whose name changes."""
        return {o: n for o, n in self.resource.items() if o != n}


@attrs.frozen
class UpdateCheck:
    """The verdict on replacing `current` with `new` on a running system.

    `domain_labels`: each running domain's label under the new policy (a `LabelRef` of the new
    policy, or None if it stays unlabelled), for the domains whose label survives: what the
    daemon records once the update is applied.
    """

    current: PolicyRef
    new: PolicyRef
    problems: tuple[UpdateProblem, ...]
    maps: LabelMaps
    domain_labels: Mapping[int, LabelRef | None]

    @property
    def allowed(self) -> bool:
        return not self.problems

    def __str__(self) -> str:
        head = f"update {self.current} -> {self.new}: "
        if self.allowed:
            return head + "allowed"
        return (
            head
            + f"refused ({len(self.problems)} reasons)\n"
            + "\n".join(f"  {p}" for p in self.problems)
        )


# --------------------------------------------------------------------------- label maps


def _map_labels(
    old_names: Iterable[str], new_labels: Iterable[tuple[str, str | None]]
) -> tuple[dict[str, str], frozenset[str], dict[str, str]]:
    old = list(old_names)
    old_set = set(old)
    pairs = list(new_labels)
    new_names = {n for n, _ in pairs}
    claimed: dict[str, str] = {}
    bad: dict[str, str] = {}
    for name, frm in pairs:
        if frm is None:
            continue
        if frm in old_set:
            claimed[frm] = name
        else:
            bad[name] = frm
    out: dict[str, str] = {}
    deleted: set[str] = set()
    for o in old:
        if o in claimed:
            out[o] = claimed[o]
        elif o in new_names:
            out[o] = o
        else:
            deleted.add(o)
    return out, frozenset(deleted), bad


def label_maps(current: Policy, new: Policy) -> LabelMaps:
    """Where each label of `current` goes in `new` (see `LabelMaps`; ``from=`` wins)."""
    vm, vm_del, vm_bad = _map_labels(
        (v.name for v in current.vm_labels), ((v.name, v.from_name) for v in new.vm_labels)
    )
    res, res_del, res_bad = _map_labels(
        (r.name for r in current.resource_labels),
        ((r.name, r.from_name) for r in new.resource_labels),
    )
    return LabelMaps(vm, res, vm_del, res_del, vm_bad, res_bad)


# --------------------------------------------------------------------------- the check


def _name_in(spec: LabelSpec, current: Policy, what: str) -> tuple[str | None, str | None]:
    """(label name, error) of a non-None label spec against the current policy."""
    if isinstance(spec, str) and ":" not in spec:
        return spec, None
    try:
        ref = spec if isinstance(spec, LabelRef) else LabelRef.parse(str(spec))
    except LabelSyntaxError as e:
        return None, str(e)
    if ref.policy != current.name:
        return None, f"{what} '{ref}' is of policy {ref.policy!r}, not the current {current.name!r}"
    return ref.label, None


def _header_problems(current: Policy, new: Policy) -> list[UpdateProblem]:
    out: list[UpdateProblem] = []
    if is_default_policy(current) or is_default_policy(new):
        return out  # ACM skipped the version check to and from its DEFAULT policy
    frm = new.from_policy
    if frm is None:
        out.append(
            UpdateProblem(
                Reason.FROM_POLICY,
                f"the new policy {new.name!r} has no FromPolicy; to replace the current policy "
                f"it must name it: FromPolicy {current.name} {current.version}",
            )
        )
    elif frm.name != current.name or frm.version != current.version:
        out.append(
            UpdateProblem(
                Reason.FROM_POLICY,
                f"the new policy updates {frm.name} {frm.version} (its FromPolicy), but the "
                f"current policy is {current.name} {current.version}",
            )
        )
    if new.version <= current.version:
        out.append(
            UpdateProblem(
                Reason.VERSION,
                f"the new version {new.version} is not greater than the current version "
                f"{current.version}",
            )
        )
    return out


def check_update(current: Policy, new: Policy, system: RunningSystem) -> UpdateCheck:
    """May `new` replace `current` while `system` runs? Every reason if not.

    `system` describes labels under `current`. Nothing is changed; the caller applies the
    update (new engine, relabelled domains per `UpdateCheck.domain_labels`) only if allowed.
    """
    maps = label_maps(current, new)
    engine = PolicyEngine(new)
    problems = _header_problems(current, new)

    for new_name, frm in maps.bad_vm_renames.items():
        problems.append(
            UpdateProblem(
                Reason.BAD_RENAME,
                f"VM label {new_name!r} is renamed from {frm!r}, which is not a VM label of the "
                f"current policy {current.name!r}",
                labels=(frm,),
            )
        )
    for new_name, frm in maps.bad_resource_renames.items():
        problems.append(
            UpdateProblem(
                Reason.BAD_RENAME,
                f"resource label {new_name!r} is renamed from {frm!r}, which is not a resource "
                f"label of the current policy {current.name!r}",
                labels=(frm,),
            )
        )

    # Each running domain's label under the new policy.
    domain_labels: dict[int, LabelRef | None] = {}
    resolved: dict[int, VmLabel] = {}
    domains = {d.domid: d for d in system.domains}
    for d in system.domains:
        who = d.describe()
        if d.label is None:
            new_spec: LabelRef | None = None
        else:
            name, err = _name_in(d.label, current, "label")
            if err is not None or name is None or current.vm_label(name) is None:
                why = err or f"label {name!r} is not a VM label of the current policy"
                problems.append(
                    UpdateProblem(Reason.LABEL, f"{who}: {why}", (d.domid,), (str(d.label),))
                )
                continue
            if name in maps.vm_deleted:
                problems.append(
                    UpdateProblem(
                        Reason.LABEL,
                        f"{who} runs with label {name!r}, which the new policy deletes "
                        "(no label of that name and none renamed from it)",
                        (d.domid,),
                        (name,),
                    )
                )
                continue
            new_spec = LabelRef(new.name, maps.vm[name])
        try:
            resolved[d.domid] = engine.resolve_domain(new_spec)
        except UnknownLabelError as e:
            problems.append(UpdateProblem(Reason.LABEL, f"{who}: {e.reason}", (d.domid,)))
            continue
        domain_labels[d.domid] = new_spec

    problems.extend(_chinese_wall(engine, system.domains, resolved))

    for i, c in enumerate(system.channels):
        la, lb = resolved.get(c.dom_a), resolved.get(c.dom_b)
        if la is None or lb is None:
            continue  # a label problem already refuses the update
        hook = c.hook
        if hook is Hook.GRANT:
            dec = engine.grant(la.name, lb.name, writable=c.writable)
        else:
            dec = engine.channel(hook, la.name, lb.name)
        if not dec.permitted:
            a, b = domains[c.dom_a].describe(), domains[c.dom_b].describe()
            problems.append(
                UpdateProblem(
                    Reason.CHANNEL,
                    f"live {c.kind} channel between {a} and {b}: {_why(dec)}",
                    (c.dom_a, c.dom_b),
                    index=i,
                )
            )

    for i, r in enumerate(system.resources):
        ld = resolved.get(r.domid)
        if ld is None:
            continue
        what = f"resource {r.resource!r}" if r.resource else "resource"
        who = domains[r.domid].describe()
        res_spec: LabelRef | None = None
        if r.label is not None:
            name, err = _name_in(r.label, current, "resource label")
            if err is not None or name is None or current.resource_label(name) is None:
                why = err or f"{name!r} is not a resource label of the current policy"
                problems.append(
                    UpdateProblem(
                        Reason.RESOURCE, f"{what} used by {who}: {why}", (r.domid,), index=i
                    )
                )
                continue
            if name in maps.resource_deleted:
                problems.append(
                    UpdateProblem(
                        Reason.RESOURCE,
                        f"{what} used by {who} has label {name!r}, which the new policy deletes",
                        (r.domid,),
                        index=i,
                    )
                )
                continue
            res_spec = LabelRef(new.name, maps.resource[name])
        dec = engine.resource(ld.name, res_spec, writable=r.writable)
        if not dec.permitted:
            problems.append(
                UpdateProblem(
                    Reason.RESOURCE, f"{what} used by {who}: {_why(dec)}", (r.domid,), index=i
                )
            )

    return UpdateCheck(current.ref, new.ref, tuple(problems), maps, domain_labels)


def _why(d: Decision) -> str:
    return f"{d.reason} [{d.rule}]"


def _chinese_wall(
    engine: PolicyEngine, domains: Iterable[RunningDomain], resolved: Mapping[int, VmLabel]
) -> list[UpdateProblem]:
    """Conflicts among the running domains' new labels, one problem per pair of labels.

    As ACM's ``chwall_init_state``: replaying the running domains as if they started now must
    not hit a blocked type. A label's blocks (`PolicyEngine.cw_blocks`) never include its own
    types, so domains sharing a label never conflict; the model forbids a label two types of
    one conflict set, which makes "A blocks B" symmetric and the replay order irrelevant.
    """
    by_label: dict[str, list[int]] = defaultdict(list)
    labels: dict[str, VmLabel] = {}
    for d in domains:
        lab = resolved.get(d.domid)
        if lab is not None:
            by_label[lab.name].append(d.domid)
            labels[lab.name] = lab
    names = sorted(by_label)
    blocks = {n: engine.cw_blocks(labels[n]) for n in names}
    out: list[UpdateProblem] = []
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            hits = {(s, t) for s, t in blocks[a] if t in labels[b].cw_types}
            hits |= {(s, t) for s, t in blocks[b] if t in labels[a].cw_types}
            if not hits:
                continue
            sets = sorted({s for s, _ in hits})
            da, db = by_label[a], by_label[b]
            out.append(
                UpdateProblem(
                    Reason.CHINESE_WALL,
                    f"running domains with label {a!r} ({_domids(da)}) and with label {b!r} "
                    f"({_domids(db)}) would conflict in Chinese Wall set "
                    f"{fmt_names(sets)}",
                    tuple(sorted(da + db)),
                    (a, b),
                )
            )
    return out


def _domids(ids: list[int], limit: int = 5) -> str:
    shown = ", ".join(str(i) for i in ids[:limit])
    if len(ids) > limit:
        shown += f" +{len(ids) - limit} more"
    return "domid " + shown if len(ids) == 1 else "domids " + shown
