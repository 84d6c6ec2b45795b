"""Static analysis of a policy: who may talk, who may never run together, what is dead.

All facts are derived with the same `PolicyEngine` the daemon decides with, so the analysis
cannot drift from enforcement. Definitions (also in docs/policy-analysis.md):

- **may communicate** (`ste_edges`): VM labels *a* and *b* (possibly the same label: two
  domains carrying it) may set up a two-way channel — the engine permits an event channel
  between them: they share an STE type and, if both carry an MLS label, the MLS labels are
  equal. This is the policy's relation; it ignores the Chinese Wall.
- **never together** (`cw_conflicts`): two different VM labels such that a running domain of
  one blocks a Chinese Wall type of the other (ACM's rule: a running label blocks the other
  types of every conflict set it shares a type with). Domains of the two labels can never run
  at the same time.
- **admissible** (`admissible`): a VM label a domain can ever be admitted with. dom0 always
  runs with the bootstrap label, so a label in conflict with the bootstrap label, or whose
  quota allows no domain, is never admissible. The bootstrap label is admissible.
- **live edges**: edges of `ste_edges` between two different admissible labels that are not
  in conflict — domains that can really run side by side and talk.
- **only through a third domain** (`indirect_pairs`): two different admissible labels with no
  direct edge but connected by a path of live edges. Information can flow between them over
  time through relaying domains (a relay need not run with both ends at once).
- **unused types**: STE types carried by no VM or resource label; Chinese Wall types carried
  by no VM label. **inert conflict sets**: fewer than two of their types are carried by
  admissible labels, so they can never block anything.
- **dead labels**: a VM label that is *never admitted* (not admissible) or *mute* (admissible
  but may not communicate with any admissible label it can run beside, itself included — e.g.
  no STE type);
  a resource label that is *unusable*: no admissible VM label may use it in any mode (a
  per-instance resource label: no admissible *dynamic* label).
  **isolated** labels (reported apart, not dead): admissible, not mute, but no live edge to
  any *other* label — their domains can talk only among themselves, not even to dom0.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import attrs

from shyped.policy.decisions import Hook, PolicyEngine
from shyped.policy.model import Policy

LabelPair = tuple[str, str]


def _pair(a: str, b: str) -> LabelPair:
    return (a, b) if a <= b else (b, a)


@attrs.frozen
class PolicyAnalysis:
    """Every derived fact about one policy (see the module docstring for the definitions).

    Pairs are sorted ``(a, b)`` with ``a <= b``; `ste_edges` include ``(a, a)`` self pairs.
    """

    policy: Policy
    ste_edges: Mapping[LabelPair, frozenset[str]]
    cw_conflicts: Mapping[LabelPair, frozenset[str]]
    admissible: frozenset[str]
    indirect_pairs: frozenset[LabelPair]
    unused_ste_types: frozenset[str]
    unused_cw_types: frozenset[str]
    inert_conflict_sets: frozenset[str]
    never_admitted: frozenset[str]
    mute: frozenset[str]
    isolated: frozenset[str]
    unusable_resources: frozenset[str]
    resource_users: Mapping[str, frozenset[str]]

    @property
    def dead_vm_labels(self) -> frozenset[str]:
        """VM labels never admitted or mute."""
        return self.never_admitted | self.mute

    @property
    def live_edges(self) -> frozenset[LabelPair]:
        """Edges between different admissible labels that can run side by side."""
        return frozenset(
            (a, b)
            for a, b in self.ste_edges
            if a != b
            and a in self.admissible
            and b in self.admissible
            and (a, b) not in self.cw_conflicts
        )

    def may_communicate(self, a: str, b: str) -> bool:
        """Does the policy permit a two-way channel between labels `a` and `b`?"""
        return _pair(a, b) in self.ste_edges

    def never_together(self, a: str, b: str) -> bool:
        """Can domains with labels `a` and `b` never run at the same time?"""
        return _pair(a, b) in self.cw_conflicts

    def to_dot(self, *, resources: bool = True, conflicts: bool = True) -> str:
        """The graph as Graphviz DOT text (see `to_dot`)."""
        return to_dot(self, resources=resources, conflicts=conflicts)


def ste_edges(
    policy: Policy, engine: PolicyEngine | None = None
) -> dict[LabelPair, frozenset[str]]:
    """Pairs of VM labels that may communicate, with their common STE types."""
    eng = engine or PolicyEngine(policy)
    names = [v.name for v in policy.vm_labels]
    out: dict[LabelPair, frozenset[str]] = {}
    for i, a in enumerate(names):
        for b in names[i:]:
            d = eng.channel(Hook.EVTCHN, a, b)
            if d.permitted:
                out[_pair(a, b)] = d.ste_types
    return out


def cw_conflicts(
    policy: Policy, engine: PolicyEngine | None = None
) -> dict[LabelPair, frozenset[str]]:
    """Pairs of different VM labels that can never run together, with the conflict sets."""
    eng = engine or PolicyEngine(policy)
    labels = policy.vm_labels
    blocks = {v.name: eng.cw_blocks(v) for v in labels}
    out: dict[LabelPair, frozenset[str]] = {}
    for i, a in enumerate(labels):
        for b in labels[i + 1 :]:
            sets = {s for s, t in blocks[a.name] if t in b.cw_types}
            sets |= {s for s, t in blocks[b.name] if t in a.cw_types}
            if sets:
                out[_pair(a.name, b.name)] = frozenset(sets)
    return out


def _components(nodes: Iterable[str], edges: Iterable[LabelPair]) -> dict[str, int]:
    adj: dict[str, list[str]] = {n: [] for n in nodes}
    for a, b in edges:
        adj[a].append(b)
        adj[b].append(a)
    comp: dict[str, int] = {}
    for start in adj:
        if start in comp:
            continue
        comp[start] = len(comp)
        stack = [start]
        while stack:
            n = stack.pop()
            for m in adj[n]:
                if m not in comp:
                    comp[m] = comp[start]
                    stack.append(m)
    return comp


def _dynamic(policy: Policy, name: str) -> bool:
    vm = policy.vm_label(name)
    return vm is not None and vm.dynamic


def analyse(policy: Policy) -> PolicyAnalysis:
    """Everything in `PolicyAnalysis` for `policy`. Cost: O(labels²) engine decisions."""
    eng = PolicyEngine(policy)
    edges = ste_edges(policy, eng)
    conflicts = cw_conflicts(policy, eng)
    boot = policy.bootstrap
    admissible = frozenset(
        v.name
        for v in policy.vm_labels
        if v.name == boot or (_pair(v.name, boot) not in conflicts and v.quota.max_domains != 0)
    )
    live = [
        (a, b)
        for a, b in edges
        if a != b and a in admissible and b in admissible and (a, b) not in conflicts
    ]
    comp = _components(sorted(admissible), live)
    adm = sorted(admissible)
    indirect = frozenset(
        (a, b)
        for i, a in enumerate(adm)
        for b in adm[i + 1 :]
        if comp[a] == comp[b] and (a, b) not in edges
    )

    used_ste = {t for v in policy.vm_labels for t in v.ste_types}
    used_ste |= {r.ste_type for r in policy.resource_labels}
    used_cw = {t for v in policy.vm_labels for t in v.cw_types}
    adm_cw = {t for v in policy.vm_labels if v.name in admissible for t in v.cw_types}
    inert = frozenset(cs.name for cs in policy.conflict_sets if len(cs.types & adm_cw) < 2)

    # Talking needs a partner that can run at the same time: the label itself (same-label
    # domains never conflict) or a live edge.
    talkers = {a for a, b in edges if a == b and a in admissible}
    talkers |= {n for pair in live for n in pair}
    mute = admissible - talkers
    has_other = {n for a, b in live for n in (a, b)}
    isolated = admissible - mute - has_other

    users: dict[str, frozenset[str]] = {}
    for r in policy.resource_labels:
        users[r.name] = frozenset(
            v
            for v in adm
            if (
                eng.resource(v, r.name, writable=False).permitted
                or eng.resource(v, r.name, writable=True).permitted
            )
            and (not r.per_instance or _dynamic(policy, v))  # only an instance uses its own
        )
    return PolicyAnalysis(
        policy=policy,
        ste_edges=edges,
        cw_conflicts=conflicts,
        admissible=admissible,
        indirect_pairs=indirect,
        unused_ste_types=frozenset(policy.ste_types) - used_ste,
        unused_cw_types=frozenset(policy.cw_types) - used_cw,
        inert_conflict_sets=inert,
        never_admitted=frozenset(v.name for v in policy.vm_labels) - admissible,
        mute=frozenset(mute),
        isolated=frozenset(isolated),
        unusable_resources=frozenset(n for n, u in users.items() if not u),
        resource_users=users,
    )


# --------------------------------------------------------------------------- DOT


def _q(s: str) -> str:
    """A DOT escString for a ``label``: backslashes doubled (so ``\\N``, ``\\n`` ... stay
    literal) and double quotes escaped. Names never go into node IDs: in a quoted DOT ID only
    ``\\"`` is an escape, so a name ending in a backslash could not be written there.
    """
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _types(types: Iterable[str], limit: int = 4) -> str:
    items = sorted(types)
    text = ", ".join(items[:limit])
    if len(items) > limit:
        text += f", +{len(items) - limit}"
    return text


def to_dot(a: PolicyAnalysis, *, resources: bool = True, conflicts: bool = True) -> str:
    """The policy as an undirected Graphviz graph (plain DOT text, render with ``dot``).

    Nodes: VM labels (ellipses ``vm0``, ``vm1`` ... in declaration order; the bootstrap label
    doubled; never-admitted labels dashed grey, mute or isolated ones orange) and, with
    `resources`, resource labels (boxes ``res0`` ...); each node's ``label`` is the label name
    (a resource's also shows its STE type). Edges: solid for "may communicate" (labelled with
    the common STE types; self pairs are not drawn), dotted from a resource to the labels that
    may use it, and with `conflicts` red dashed for "never together" (labelled with the
    conflict sets).
    """
    p = a.policy
    vm_id = {v.name: f"vm{i}" for i, v in enumerate(p.vm_labels)}
    res_id = {r.name: f"res{i}" for i, r in enumerate(p.resource_labels)}
    out = [
        "graph policy {",
        f"  graph [label={_q(f'policy {p.name} {p.version}')}, labelloc=t];",
        "  node [shape=ellipse];",
    ]
    for v in p.vm_labels:
        attrs_: list[str] = [f"label={_q(v.name)}"]
        if v.name == p.bootstrap:
            attrs_.append("peripheries=2")
        if v.name in a.never_admitted:
            attrs_ += ["style=dashed", "color=grey", "fontcolor=grey"]
        elif v.name in a.mute or v.name in a.isolated:
            attrs_.append("color=orange")
        out.append(f"  {vm_id[v.name]} [{', '.join(attrs_)}];")
    if resources:
        for r in p.resource_labels:
            style = ", style=dashed, color=grey" if r.name in a.unusable_resources else ""
            text = f"{r.name} [{r.ste_type}]"
            out.append(f"  {res_id[r.name]} [shape=box, label={_q(text)}{style}];")
    for (x, y), types in sorted(a.ste_edges.items()):
        if x != y:
            out.append(f"  {vm_id[x]} -- {vm_id[y]} [label={_q(_types(types))}];")
    if resources:
        for r in p.resource_labels:
            for user in sorted(a.resource_users[r.name]):
                out.append(f"  {res_id[r.name]} -- {vm_id[user]} [style=dotted];")
    if conflicts:
        for (x, y), sets in sorted(a.cw_conflicts.items()):
            out.append(
                f"  {vm_id[x]} -- {vm_id[y]} [color=red, style=dashed, constraint=false, "
                f"label={_q(_types(sets))}, fontcolor=red];"
            )
    out.append("}")
    return "\n".join(out) + "\n"
