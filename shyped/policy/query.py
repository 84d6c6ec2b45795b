"""Questions about a policy's analysis, answered as text and JSON (pure).

`can_talk` answers "can a domain with label A get information to one with label B?" with a
reason: **direct** (a channel is permitted and the two can run side by side), **indirect**
(no direct channel, but a chain of labels that can each run beside the next and talk relays
it; a relay may store and forward, so the ends need not run at the same time), or **no**.
`summary` / `summary_lines` print what `analysis.analyse` derives (docs/policy-analysis.md).
"""

from __future__ import annotations

from collections import deque
from typing import Any, Literal

import attrs

from shyped.policy.analysis import LabelPair, PolicyAnalysis
from shyped.policy.decisions import Hook, PolicyEngine

Verdict = Literal["direct", "indirect", "no"]


@attrs.frozen
class Answer:
    """The answer to `can_talk`: the verdict, why, and the chain of labels (A ... B)."""

    source: str
    target: str
    verdict: Verdict
    reason: str
    path: tuple[str, ...] = ()

    @property
    def yes(self) -> bool:
        return self.verdict != "no"

    def to_json(self) -> dict[str, Any]:
        d = attrs.asdict(self)
        d["path"] = list(self.path)
        return d


def _pair(a: str, b: str) -> LabelPair:
    return (a, b) if a <= b else (b, a)


def _never_admitted_why(a: PolicyAnalysis, name: str) -> str:
    p = a.policy
    label = p.vm_label(name)
    if label is not None and label.quota.max_domains == 0:
        return f"{name!r} is never admissible: its quota allows no domain (max_domains = 0)"
    sets = a.cw_conflicts.get(_pair(name, p.bootstrap), frozenset())
    return (
        f"{name!r} is never admissible: it conflicts with dom0's label {p.bootstrap!r} "
        f"(conflict set {', '.join(map(repr, sorted(sets)))})"
    )


def _chain(a: PolicyAnalysis, source: str, target: str) -> tuple[str, ...]:
    """The shortest chain of live edges from `source` to `target` (empty if none)."""
    adj: dict[str, list[str]] = {}
    for x, y in sorted(a.live_edges):
        adj.setdefault(x, []).append(y)
        adj.setdefault(y, []).append(x)
    prev: dict[str, str] = {source: source}
    todo = deque([source])
    while todo:
        n = todo.popleft()
        if n == target:
            out = [n]
            while out[-1] != source:
                out.append(prev[out[-1]])
            return tuple(reversed(out))
        for m in adj.get(n, ()):
            if m not in prev:
                prev[m] = n
                todo.append(m)
    return ()


def can_talk(a: PolicyAnalysis, source: str, target: str) -> Answer:
    """Can information get from a domain labelled `source` to one labelled `target`?

    `KeyError` if either is not a VM label of the policy."""
    p = a.policy
    for name in (source, target):
        if p.vm_label(name) is None:
            raise KeyError(name)
    for name in (source, target):
        if name not in a.admissible:
            return Answer(source, target, "no", _never_admitted_why(a, name))
    d = PolicyEngine(p).channel(Hook.EVTCHN, source, target)
    together = source == target or not a.never_together(source, target)
    if d.permitted and together:
        return Answer(
            source, target, "direct", f"{d.reason}; they can run side by side", (source, target)
        )
    if d.permitted:
        sets = ", ".join(map(repr, sorted(a.cw_conflicts[_pair(source, target)])))
        direct_no = (
            f"a channel would be permitted, but they never run together (conflict set {sets})"
        )
    else:
        direct_no = d.reason
    chain = _chain(a, source, target) if source != target else ()
    if chain:
        via = " -> ".join(chain)
        return Answer(
            source,
            target,
            "indirect",
            f"no direct channel ({direct_no}), but information can flow through {via} "
            "(a relay may store and forward)",
            chain,
        )
    return Answer(source, target, "no", f"{direct_no}; and no chain of labels connects them")


def summary(a: PolicyAnalysis) -> dict[str, Any]:
    """What the analysis found, as JSON-ready data."""
    p = a.policy

    def pairs(items: Any) -> list[list[str]]:
        return [list(x) for x in sorted(items)]

    return {
        "policy": {"name": p.name, "version": str(p.version)},
        "may_communicate": [
            {"labels": list(k), "ste_types": sorted(v)} for k, v in sorted(a.ste_edges.items())
        ],
        "live_edges": pairs(a.live_edges),
        "indirect": pairs(a.indirect_pairs),
        "never_together": [
            {"labels": list(k), "conflict_sets": sorted(v)}
            for k, v in sorted(a.cw_conflicts.items())
        ],
        "resource_users": {k: sorted(v) for k, v in sorted(a.resource_users.items())},
        "admissible": sorted(a.admissible),
        "never_admitted": sorted(a.never_admitted),
        "mute": sorted(a.mute),
        "isolated": sorted(a.isolated),
        "unusable_resources": sorted(a.unusable_resources),
        "inert_conflict_sets": sorted(a.inert_conflict_sets),
        "unused_ste_types": sorted(a.unused_ste_types),
        "unused_cw_types": sorted(a.unused_cw_types),
        "dynamic": {
            v.name: {
                "shared": sorted(v.shared_types),
                "instances_apart": not a.may_communicate(v.name, v.name),
            }
            for v in p.vm_labels
            if v.dynamic
        },
        "per_instance_resources": sorted(r.name for r in p.resource_labels if r.per_instance),
    }


def summary_lines(a: PolicyAnalysis) -> list[str]:
    """The analysis for a terminal."""
    p = a.policy
    live = a.live_edges
    out = [
        f"policy {p.name} {p.version}: {len(p.vm_labels)} VM labels "
        f"({len(a.admissible)} admissible), {len(p.resource_labels)} resource labels",
        "",
        "may talk (a channel is permitted; '~' : never at the same time):",
    ]
    for (x, y), types in sorted(a.ste_edges.items()):
        if x == y:
            continue
        mark = "--" if (x, y) in live else "~ "
        out.append(f"  {x} {mark} {y}  [{', '.join(sorted(types))}]")
    selves = sorted(x for x, y in a.ste_edges if x == y)
    if selves:
        out.append(f"  same label talks to itself: {', '.join(selves)}")
    apart = sorted(v.name for v in p.vm_labels if v.dynamic and v.name not in selves)
    if apart:
        out.append(f"  dynamic, instances cannot talk to each other: {', '.join(apart)}")
    out += ["", "only through a third domain:"]
    out += [f"  {x} .. {y}" for x, y in sorted(a.indirect_pairs)] or ["  (none)"]
    out += ["", "never together (Chinese Wall):"]
    out += [
        f"  {x} / {y}  [{', '.join(sorted(s))}]" for (x, y), s in sorted(a.cw_conflicts.items())
    ] or ["  (none)"]
    out += ["", "resources (who may use them):"]
    for r in p.resource_labels:
        users = ", ".join(sorted(a.resource_users[r.name])) or "(nobody)"
        out.append(f"  {r.name} [{r.ste_type}]: {users}")
    dead = [
        ("never admissible", a.never_admitted),
        ("mute", a.mute),
        ("isolated", a.isolated),
        ("unusable resources", a.unusable_resources),
        ("inert conflict sets", a.inert_conflict_sets),
        ("unused STE types", a.unused_ste_types),
        ("unused Chinese Wall types", a.unused_cw_types),
    ]
    found = [(k, v) for k, v in dead if v]
    if found:
        out += ["", "dead or suspicious (see `shypectl policy lint`):"]
        out += [f"  {k}: {', '.join(sorted(v))}" for k, v in found]
    return out
