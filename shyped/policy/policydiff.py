"""What changes between two policies, item by item (pure): `diff(old, new)`.

Items: the header (name, version, bootstrap, ``from``, defaults), STE and Chinese Wall types,
MLS levels and categories, conflict sets, VM labels and resource labels. A label is
**renamed** when the new policy says so (``from = "old"``, the way an update keeps
assignments); a label removed and another added with exactly the same content but no
``from`` is reported as a *possible* rename, since without ``from`` the update check treats
it as a deletion and the label store's assignments of the old name are not carried over.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Literal

import attrs

from shyped.policy.model import MlsLabel, Policy, Quota, ResourceLabel, VmLabel

Op = Literal["+", "-", "~", "renamed", "renamed?"]


@attrs.frozen
class Change:
    """One difference: added (+), removed (-), changed (~), renamed, or a possible rename."""

    op: Op
    kind: str
    name: str
    detail: str = ""

    def __str__(self) -> str:
        mark = {"+": "+", "-": "-", "~": "~", "renamed": ">", "renamed?": "?"}[self.op]
        tail = f": {self.detail}" if self.detail else ""
        return f"{mark} {self.kind} {self.name}{tail}"

    def to_json(self) -> dict[str, Any]:
        return attrs.asdict(self)


def _set_delta(what: str, old: Iterable[str], new: Iterable[str]) -> list[str]:
    a, b = set(old), set(new)
    parts = [f"+{x}" for x in sorted(b - a)] + [f"-{x}" for x in sorted(a - b)]
    return [f"{what} {' '.join(parts)}"] if parts else []


def _mls(m: MlsLabel | None) -> str:
    return "none" if m is None else str(m)


def _quota(q: Quota) -> str:
    fields = attrs.asdict(q)
    shown = [f"{k}={v}" for k, v in fields.items() if v is not None]
    return ", ".join(shown) or "unlimited"


def _vm_delta(a: VmLabel, b: VmLabel) -> list[str]:
    out = _set_delta("ste", a.ste_types, b.ste_types) + _set_delta("cw", a.cw_types, b.cw_types)
    if a.mls != b.mls:
        out.append(f"mls {_mls(a.mls)} -> {_mls(b.mls)}")
    if a.quota != b.quota:
        out.append(f"quota {_quota(a.quota)} -> {_quota(b.quota)}")
    if a.dynamic != b.dynamic:
        out.append("dynamic" if b.dynamic else "no longer dynamic")
    out += _set_delta("shared", a.shared_types, b.shared_types)
    return out


def _res_delta(a: ResourceLabel, b: ResourceLabel) -> list[str]:
    out = [] if a.ste_type == b.ste_type else [f"ste {a.ste_type} -> {b.ste_type}"]
    if a.mls != b.mls:
        out.append(f"mls {_mls(a.mls)} -> {_mls(b.mls)}")
    if a.per_instance != b.per_instance:
        out.append("per instance" if b.per_instance else "no longer per instance")
    return out


def _labels(
    kind: str,
    old: Mapping[str, Any],
    new: Mapping[str, Any],
    delta: Any,
) -> list[Change]:
    out: list[Change] = []
    renamed_from = {
        lab.from_name: name
        for name, lab in new.items()
        if lab.from_name is not None and lab.from_name in old and lab.from_name not in new
    }
    added = [n for n in new if n not in old and n not in renamed_from.values()]
    removed = [n for n in old if n not in new and n not in renamed_from]
    for o, n in sorted(renamed_from.items()):
        d = delta(old[o], new[n])
        out.append(Change("renamed", kind, f"{o} -> {n}", "; ".join(["from=", *d])))
    for n in sorted(added):
        twins = [o for o in removed if not delta(old[o], new[n])]
        if twins:
            out.append(
                Change(
                    "renamed?",
                    kind,
                    f"{twins[0]} -> {n}",
                    f"same content; without from = {twins[0]!r} the update check sees a "
                    "deletion and assignments of the old name are lost",
                )
            )
            removed.remove(twins[0])
        else:
            out.append(Change("+", kind, n))
    out += [Change("-", kind, n) for n in sorted(removed)]
    for n in sorted(set(old) & set(new)):
        d = delta(old[n], new[n])
        if d:
            out.append(Change("~", kind, n, "; ".join(d)))
    return out


def diff(old: Policy, new: Policy) -> list[Change]:
    """Every difference from `old` to `new`, header first, then declarations, then labels."""
    out: list[Change] = []
    for field, a, b in (
        ("name", old.name, new.name),
        ("version", str(old.version), str(new.version)),
        ("bootstrap", old.bootstrap, new.bootstrap),
        ("from", str(old.from_policy or "none"), str(new.from_policy or "none")),
        (
            "unlabelled_domain",
            old.defaults.unlabelled_domain or "deny",
            new.defaults.unlabelled_domain or "deny",
        ),
        (
            "unlabelled_resource",
            old.defaults.unlabelled_resource or "deny",
            new.defaults.unlabelled_resource or "deny",
        ),
    ):
        if a != b:
            out.append(Change("~", "policy", field, f"{a} -> {b}"))
    for kind, a_, b_ in (
        ("STE type", old.ste_types, new.ste_types),
        ("CW type", old.cw_types, new.cw_types),
        ("MLS level", old.mls_levels, new.mls_levels),
        ("MLS category", old.mls_categories, new.mls_categories),
    ):
        out += [Change("+", kind, t) for t in b_ if t not in a_]
        out += [Change("-", kind, t) for t in a_ if t not in b_]
    if [x for x in old.mls_levels if x in new.mls_levels] != [
        x for x in new.mls_levels if x in old.mls_levels
    ]:
        out.append(
            Change("~", "MLS level", "order", f"{list(old.mls_levels)} -> {list(new.mls_levels)}")
        )
    a_sets = {c.name: c for c in old.conflict_sets}
    b_sets = {c.name: c for c in new.conflict_sets}
    out += [
        Change("+", "conflict set", n, ", ".join(sorted(b_sets[n].types)))
        for n in b_sets
        if n not in a_sets
    ]
    out += [Change("-", "conflict set", n) for n in a_sets if n not in b_sets]
    for n in a_sets.keys() & b_sets.keys():
        d = _set_delta("types", a_sets[n].types, b_sets[n].types)
        if d:
            out.append(Change("~", "conflict set", n, d[0]))
    out += _labels(
        "VM label",
        {v.name: v for v in old.vm_labels},
        {v.name: v for v in new.vm_labels},
        _vm_delta,
    )
    out += _labels(
        "resource label",
        {r.name: r for r in old.resource_labels},
        {r.name: r for r in new.resource_labels},
        _res_delta,
    )
    return out
