"""Access decisions: the `Decision` record and the `PolicyEngine` facade over one policy.

Every check returns a `Decision` saying whether it permits, at which hook, which rule decided,
the labels/types/conflict set/MLS labels involved and a one-line reason meant for a log line::

    deny vchan [ste]: 'bank-a' and 'bank-b' share no STE type

The engine is tied to one `Policy` instance: it owns the STE pair cache and a bounded decision
cache, so a new policy means a new engine and nothing stale survives. Channel and resource
decisions never look at the running domains; Chinese Wall admission goes through a
`shyped.policy.chinese_wall.RunningSet` (per-type counts). All of it is pure: no I/O.

Labels are accepted as a `LabelInput`: a VM/resource label name of the engine's policy, a
``ACM:<policy>:<label>`` string or `LabelRef` (the policy name must be the engine's), or None
for "unlabelled" (the policy's `Defaults` say deny or which label to use).
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from typing import Final, TypeAlias

import attrs

from shyped.policy import mls
from shyped.policy.errors import LabelSyntaxError
from shyped.policy.model import LabelRef, MlsLabel, Policy, ResourceLabel, VmLabel
from shyped.policy.ste import DEFAULT_CACHE_SIZE, StePairCache

LabelInput: TypeAlias = str | LabelRef | None


class Hook(enum.StrEnum):
    """Where a decision is taken (see DESIGN.md §1)."""

    DOMAIN_ADMIT = "domain-admit"
    EVTCHN = "evtchn"
    DEVICE_CHANNEL = "device-channel"
    GRANT = "grant"
    VCHAN = "vchan"
    XS_CHANNEL = "xs-channel"  #: a guest-owned xenstore node another guest may reach
    RESOURCE = "resource"
    POLICY_UPDATE = "policy-update"


#: Hooks of two-way channels between two domains.
CHANNEL_HOOKS: Final = frozenset(
    {Hook.EVTCHN, Hook.DEVICE_CHANNEL, Hook.VCHAN, Hook.GRANT, Hook.XS_CHANNEL}
)


class Rule(enum.StrEnum):
    """The rule that decided."""

    STE = "ste"
    CHINESE_WALL = "chinese-wall"
    MLS = "mls"
    DEFAULT = "default"  # unlabelled subject/resource and the policy says deny
    LABEL = "label"  # label unknown, malformed, or of another policy
    QUOTA = "quota"  # a per-label quota (shyped.core.quota)
    AUDIT = "audit"  # the audit trail cannot record the decision (fail-closed): denied
    DENIED_DOMAIN = "denied-domain"  # a party is a domain denied admission (fail-closed)


@attrs.frozen
class Decision:
    """The outcome of one check. Immutable, so engines may cache and share them.

    `subject_label`/`object_label` are the label names the decision was taken on (after
    applying defaults), or the raw input when it did not resolve. `ste_types`: the common STE
    types (channel) or the resource's type (resource use). `cw_types`/`conflict_set`: the
    Chinese Wall types in conflict and one set they conflict in. `mls`: (subject's, object's)
    MLS labels when the MLS rule was applied.
    """

    permitted: bool
    hook: Hook
    rule: Rule
    reason: str
    subject_label: str | None = None
    object_label: str | None = None
    ste_types: frozenset[str] = frozenset()
    cw_types: frozenset[str] = frozenset()
    conflict_set: str | None = None
    mls: tuple[MlsLabel, ...] = ()

    @property
    def verdict(self) -> str:
        return "permit" if self.permitted else "deny"

    def __str__(self) -> str:
        return f"{self.verdict} {self.hook} [{self.rule}]: {self.reason}"


class UnknownLabelError(LookupError):
    """A label did not resolve to a label of the engine's policy (the message says why)."""

    def __init__(self, reason: str, rule: Rule) -> None:
        super().__init__(reason)
        self.reason = reason
        self.rule = rule


def fmt_names(names: Iterable[str], limit: int = 6) -> str:
    """``'a', 'b'`` sorted, cut after `limit` names; for reasons."""
    items = sorted(names)
    shown = ", ".join(repr(n) for n in items[:limit])
    if len(items) > limit:
        shown += f" (+{len(items) - limit} more)"
    return shown


def instances_apart(a: str, b: str, private: frozenset[str]) -> str:
    """Why two instances of dynamic labels `a` and `b` may not talk (docs/policy.md)."""
    which = f"instances of dynamic label {a}" if a == b else f"instances of {a} and {b}"
    return (
        f"{which} share no STE type: {fmt_names(private)} is private to each instance "
        "and no shared type is common to both"
    )


@attrs.frozen
class _Resolved:
    """A label input resolved (or not) against the policy."""

    label: VmLabel | ResourceLabel | None
    desc: str  # for reasons: "'web'" or "unlabelled (default 'guest')", or why it failed
    rule: Rule | None = None  # set when it failed
    raw: str | None = None  # the input as text, for failed resolutions


def _label_parts(label: LabelInput, policy: Policy) -> tuple[str | None, str | None]:
    """(name, error) of a non-None label input."""
    if isinstance(label, str) and ":" not in label:
        return label, None
    if isinstance(label, str):
        try:
            ref = LabelRef.parse(label)
        except LabelSyntaxError as e:
            return None, str(e)
    else:
        assert label is not None
        ref = label
    if ref.policy != policy.name:
        return None, f"label '{ref}' is of policy {ref.policy!r}, not the active {policy.name!r}"
    return ref.label, None


class PolicyEngine:
    """Decisions under one policy, with caches valid for exactly that policy."""

    def __init__(self, policy: Policy, *, cache_size: int = DEFAULT_CACHE_SIZE) -> None:
        self.policy: Final = policy
        self._cache_size = cache_size
        self._ste = StePairCache(policy, cache_size)
        self._decisions: dict[tuple[Hook, LabelInput, LabelInput, bool], Decision] = {}
        self._vm_res: dict[LabelInput, _Resolved] = {}
        self._res_res: dict[LabelInput, _Resolved] = {}
        self._cw_blocks: dict[str, tuple[tuple[str, str], ...]] = {}

    def __repr__(self) -> str:
        return f"PolicyEngine({self.policy.name} {self.policy.version})"

    # ---------------------------------------------------------------- resolution

    def _bounded_put(
        self, cache: dict[LabelInput, _Resolved], key: LabelInput, v: _Resolved
    ) -> None:
        if len(cache) >= self._cache_size:
            cache.clear()
        cache[key] = v

    def _resolve_vm(self, label: LabelInput) -> _Resolved:
        hit = self._vm_res.get(label)
        if hit is not None:
            return hit
        p = self.policy
        res: _Resolved
        if label is None:
            default = p.defaults.unlabelled_domain
            if default is None:
                res = _Resolved(
                    None, "unlabelled domains are denied by the policy", Rule.DEFAULT, None
                )
            else:
                res = _Resolved(p.vm_label(default), f"unlabelled (default {default!r})")
        else:
            name, err = _label_parts(label, p)
            raw = str(label)
            if err is not None:
                res = _Resolved(None, err, Rule.LABEL, raw)
            else:
                assert name is not None
                lab = p.vm_label(name)
                if lab is None:
                    res = _Resolved(
                        None, f"unknown VM label {name!r} in policy {p.name!r}", Rule.LABEL, raw
                    )
                else:
                    res = _Resolved(lab, repr(name))
        self._bounded_put(self._vm_res, label, res)
        return res

    def _resolve_resource(self, label: LabelInput) -> _Resolved:
        hit = self._res_res.get(label)
        if hit is not None:
            return hit
        p = self.policy
        res: _Resolved
        if label is None:
            default = p.defaults.unlabelled_resource
            if default is None:
                res = _Resolved(
                    None, "unlabelled resources are denied by the policy", Rule.DEFAULT, None
                )
            else:
                res = _Resolved(
                    p.resource_label(default), f"unlabelled resource (default {default!r})"
                )
        else:
            name, err = _label_parts(label, p)
            raw = str(label)
            if err is not None:
                res = _Resolved(None, err, Rule.LABEL, raw)
            else:
                assert name is not None
                lab = p.resource_label(name)
                if lab is None:
                    res = _Resolved(
                        None,
                        f"unknown resource label {name!r} in policy {p.name!r}",
                        Rule.LABEL,
                        raw,
                    )
                else:
                    res = _Resolved(lab, f"resource {name!r}")
        self._bounded_put(self._res_res, label, res)
        return res

    def resolve_domain(self, label: LabelInput) -> VmLabel:
        """The VM label a domain labelled `label` runs with; `UnknownLabelError` if none."""
        r = self._resolve_vm(label)
        if r.label is None:
            assert r.rule is not None
            raise UnknownLabelError(r.desc, r.rule)
        assert isinstance(r.label, VmLabel)
        return r.label

    def resolve_resource(self, label: LabelInput) -> ResourceLabel:
        """The resource label a resource labelled `label` has; `UnknownLabelError` if none."""
        r = self._resolve_resource(label)
        if r.label is None:
            assert r.rule is not None
            raise UnknownLabelError(r.desc, r.rule)
        assert isinstance(r.label, ResourceLabel)
        return r.label

    def describe_domain(self, label: LabelInput) -> str:
        """How reasons name a domain label: ``'web'``, ``unlabelled (default 'guest')``."""
        return self._resolve_vm(label).desc

    # ---------------------------------------------------------------- decisions

    def channel(self, hook: Hook, a: LabelInput, b: LabelInput) -> Decision:
        """May domains labelled `a` and `b` set up a two-way channel at `hook`?

        `hook` is EVTCHN, DEVICE_CHANNEL (frontend/backend), VCHAN, XS_CHANNEL (a guest-owned
        xenstore node the other may read or write) or GRANT (a writable grant map). STE: a
        common type; MLS (if both carry one): equal labels.
        """
        if hook not in CHANNEL_HOOKS:
            raise ValueError(f"{hook} is not a channel hook")
        key = (hook, a, b, True)
        hit = self._decisions.get(key)
        if hit is not None:
            return hit
        return self._store(key, self._pair(hook, a, b, writable=True))

    def grant(self, mapper: LabelInput, granter: LabelInput, *, writable: bool = True) -> Decision:
        """May `mapper` map a page granted by `granter`?

        STE: a common type (as ACM's grant-map hook). MLS: writable maps need equal labels,
        read-only maps need the mapper to dominate the granter.
        """
        key = (Hook.GRANT, mapper, granter, writable)
        hit = self._decisions.get(key)
        if hit is not None:
            return hit
        return self._store(key, self._pair(Hook.GRANT, mapper, granter, writable=writable))

    def resource(self, domain: LabelInput, resource: LabelInput, *, writable: bool) -> Decision:
        """May a domain labelled `domain` use a resource labelled `resource`?

        STE: the domain's label holds the resource's type. MLS (if both carry one): read-only
        use needs the domain to dominate the resource, read-write use needs equal labels.
        """
        key = (Hook.RESOURCE, domain, resource, writable)
        hit = self._decisions.get(key)
        if hit is not None:
            return hit
        return self._store(key, self._resource(domain, resource, writable=writable))

    def cw_blocks(self, label: VmLabel) -> tuple[tuple[str, str], ...]:
        """(conflict set, type) pairs a running domain with `label` blocks, with multiplicity.

        As ACM's ``chwall_pre_domain_create``: for each conflict set sharing a type with the
        label, every type of the set that is *not* one of the label's own types.
        """
        hit = self._cw_blocks.get(label.name)
        if hit is not None:
            return hit
        out: list[tuple[str, str]] = []
        for cs in self.policy.conflict_sets:
            if cs.types & label.cw_types:
                out.extend((cs.name, t) for t in sorted(cs.types - label.cw_types))
        blocks = tuple(out)
        self._cw_blocks[label.name] = blocks
        return blocks

    # ---------------------------------------------------------------- internals

    def _store(self, key: tuple[Hook, LabelInput, LabelInput, bool], d: Decision) -> Decision:
        if len(self._decisions) >= self._cache_size:
            self._decisions.clear()
        self._decisions[key] = d
        return d

    @staticmethod
    def _unresolved(
        hook: Hook,
        failed: list[tuple[str, _Resolved]],
        subject: str | None,
        obj: str | None,
    ) -> Decision:
        """Deny for labels that did not resolve; the same rule whichever side failed first."""
        rules = {r.rule for _, r in failed}
        rule = Rule.LABEL if Rule.LABEL in rules else Rule.DEFAULT
        reason = "; ".join(f"{who}: {r.desc}" for who, r in failed)
        return Decision(False, hook, rule, reason, subject, obj)

    def _pair(self, hook: Hook, a: LabelInput, b: LabelInput, *, writable: bool) -> Decision:
        ra, rb = self._resolve_vm(a), self._resolve_vm(b)
        la, lb = ra.label, rb.label
        name_a = la.name if la is not None else ra.raw
        name_b = lb.name if lb is not None else rb.raw
        first, second = ("mapper", "granter") if hook is Hook.GRANT else ("first", "second")
        if la is None or lb is None:
            failed = [(f"{w} domain", r) for w, r in ((first, ra), (second, rb)) if r.label is None]
            return self._unresolved(hook, failed, name_a, name_b)
        assert isinstance(la, VmLabel) and isinstance(lb, VmLabel)
        common = self._ste.common(la.name, lb.name)
        if not common:
            return Decision(
                False, hook, Rule.STE, f"{ra.desc} and {rb.desc} share no STE type", name_a, name_b
            )
        private = la.private_types & lb.private_types  # two domains of dynamic labels
        if common & private:  # are two instances: each holds these types alone
            common -= private
            if not common:
                reason = instances_apart(ra.desc, rb.desc, private)
                return Decision(False, hook, Rule.STE, reason, name_a, name_b)
        ste_ok = f"{ra.desc} and {rb.desc} share STE type {fmt_names(common)}"
        if la.mls is None or lb.mls is None:
            return Decision(True, hook, Rule.STE, ste_ok, name_a, name_b, common)
        pair = (la.mls, lb.mls)
        if hook is Hook.GRANT and not writable:
            if mls.read_ok(self.policy, la.mls, lb.mls):
                reason = f"{ste_ok}; MLS {la.mls} dominates {lb.mls} (read-only grant)"
                return Decision(True, hook, Rule.MLS, reason, name_a, name_b, common, mls=pair)
            reason = (
                f"a read-only grant needs the mapper {ra.desc} ({la.mls}) to dominate "
                f"the granter {rb.desc} ({lb.mls})"
            )
            return Decision(False, hook, Rule.MLS, reason, name_a, name_b, common, mls=pair)
        if mls.two_way_ok(la.mls, lb.mls):
            reason = f"{ste_ok}; MLS levels equal ({la.mls})"
            return Decision(True, hook, Rule.MLS, reason, name_a, name_b, common, mls=pair)
        what = "a writable grant" if hook is Hook.GRANT else "a two-way channel"
        reason = f"{what} needs equal MLS labels: {ra.desc} is {la.mls}, {rb.desc} is {lb.mls}"
        return Decision(False, hook, Rule.MLS, reason, name_a, name_b, common, mls=pair)

    def _resource(self, domain: LabelInput, resource: LabelInput, *, writable: bool) -> Decision:
        hook = Hook.RESOURCE
        rd, rr = self._resolve_vm(domain), self._resolve_resource(resource)
        ld, lr = rd.label, rr.label
        name_d = ld.name if ld is not None else rd.raw
        name_r = lr.name if lr is not None else rr.raw
        if ld is None or lr is None:
            failed = [(w, r) for w, r in (("domain", rd), ("resource", rr)) if r.label is None]
            return self._unresolved(hook, failed, name_d, name_r)
        assert isinstance(ld, VmLabel) and isinstance(lr, ResourceLabel)
        rtype = lr.ste_types
        mode = "read-write" if writable else "read-only"
        if lr.ste_type not in ld.ste_types:
            reason = f"domain {rd.desc} lacks STE type {lr.ste_type!r} of {rr.desc}"
            return Decision(False, hook, Rule.STE, reason, name_d, name_r, rtype)
        ste_ok = f"domain {rd.desc} holds STE type {lr.ste_type!r} of {rr.desc} ({mode})"
        if ld.mls is None or lr.mls is None:
            return Decision(True, hook, Rule.STE, ste_ok, name_d, name_r, rtype)
        pair = (ld.mls, lr.mls)
        if writable:
            if mls.equal(ld.mls, lr.mls):
                reason = f"{ste_ok}; MLS levels equal ({ld.mls})"
                return Decision(True, hook, Rule.MLS, reason, name_d, name_r, rtype, mls=pair)
            reason = (
                f"read-write use needs equal MLS labels: domain {rd.desc} is {ld.mls}, "
                f"{rr.desc} is {lr.mls}"
            )
            return Decision(False, hook, Rule.MLS, reason, name_d, name_r, rtype, mls=pair)
        if mls.read_ok(self.policy, ld.mls, lr.mls):
            reason = f"{ste_ok}; MLS {ld.mls} dominates {lr.mls}"
            return Decision(True, hook, Rule.MLS, reason, name_d, name_r, rtype, mls=pair)
        reason = f"read-only use needs domain {rd.desc} ({ld.mls}) to dominate {rr.desc} ({lr.mls})"
        return Decision(False, hook, Rule.MLS, reason, name_d, name_r, rtype, mls=pair)
