"""Policy analysis: the ACM example, each kind of dead label, a brute-force reference, DOT."""

from __future__ import annotations

import json
import shutil
import subprocess
from itertools import combinations_with_replacement
from pathlib import Path

import pytest
from acm_helpers import policies
from hypothesis import given, settings

from shyped.policy import acm_xml
from shyped.policy.analysis import PolicyAnalysis, analyse
from shyped.policy.model import (
    ConflictSet,
    MlsLabel,
    Policy,
    PolicyVersion,
    Quota,
    ResourceLabel,
    VmLabel,
)

CLIENT = Path(__file__).parent / "acm" / "client_v1-security_policy.xml"
DOT = shutil.which("dot")  # graphviz is in scripts/install-deps.sh


def test_client_v1_example() -> None:
    a = analyse(acm_xml.load(CLIENT).policy)
    assert dict(a.cw_conflicts) == {("dom_Fun", "dom_HomeBanking"): {"Protection1"}}
    assert a.never_together("dom_HomeBanking", "dom_Fun")
    assert a.may_communicate("dom_StorageDomain", "dom_HomeBanking")
    assert a.ste_edges[("dom_HomeBanking", "dom_StorageDomain")] == {"ste_PersonalFinances"}
    assert not a.may_communicate("dom_HomeBanking", "dom_Fun")
    assert a.may_communicate("dom_Fun", "dom_Fun")  # two domains with the same label
    # The Chinese Wall keeps banking and fun apart in time only: relays connect them.
    assert ("dom_Fun", "dom_HomeBanking") in a.indirect_pairs
    assert ("dom_BoincClient", "dom_HomeBanking") in a.indirect_pairs
    assert ("dom_HomeBanking", "dom_StorageDomain") not in a.indirect_pairs
    assert a.admissible == {v.name for v in a.policy.vm_labels}
    assert a.dead_vm_labels == frozenset() and a.isolated == frozenset()
    assert a.unused_ste_types == frozenset() == a.unused_cw_types == a.inert_conflict_sets
    assert a.resource_users["res_HardDrive(hda)"] == {"SystemManagement", "dom_StorageDomain"}
    assert a.unusable_resources == frozenset()


def _lab(name: str, ste: list[str], cw: list[str] = [], **kw: object) -> VmLabel:  # noqa: B006
    return VmLabel(name, ste, cw, **kw)  # type: ignore[arg-type]


DEADLY = Policy(
    name="deadly",
    version=PolicyVersion(1, 0),
    bootstrap="dom0",
    ste_types=["mgmt", "a", "lonely", "spare", "orphan"],
    cw_types=["c_mgmt", "c_rival", "c_x", "c_y", "c_unused"],
    conflict_sets=[
        ConflictSet("vs_dom0", ["c_mgmt", "c_rival"]),
        ConflictSet("xy", ["c_x", "c_y"]),
    ],
    vm_labels=[
        _lab("dom0", ["mgmt", "a"], ["c_mgmt"]),
        _lab("guest", ["a"], ["c_x"]),
        _lab("rival", ["a"], ["c_rival"]),  # conflicts with dom0: never admitted
        _lab("capped", ["a"], quota=Quota(max_domains=0)),  # never admitted
        _lab("silent", []),  # no STE type: mute
        _lab("hermit", ["lonely"]),  # talks only to other hermits: isolated
        _lab("high", ["a"], mls=MlsLabel("high")),
        _lab("low", ["a"], mls=MlsLabel("low")),
        _lab("via", ["mgmt"]),
    ],
    resource_labels=[
        ResourceLabel("disk", "a"),
        ResourceLabel("nowhere", "orphan"),  # no VM label holds 'orphan'
        ResourceLabel("rivaldisk", "lonely"),
    ],
    mls_levels=["low", "high"],
)


def test_each_kind_of_dead_label() -> None:
    a = analyse(DEADLY)
    assert a.never_admitted == {"rival", "capped"}
    assert a.mute == {"silent"}
    assert a.dead_vm_labels == {"rival", "capped", "silent"}
    assert a.isolated == {"hermit"}
    assert a.unusable_resources == {"nowhere"}
    assert a.resource_users["rivaldisk"] == {"hermit"}
    assert a.unused_ste_types == {"spare"}
    assert a.unused_cw_types == {"c_unused", "c_y"}
    # 'vs_dom0' has c_rival only on a label that can never run; 'xy' only c_x in use.
    assert a.inert_conflict_sets == {"vs_dom0", "xy"}
    # MLS: both carry MLS labels and they differ: no channel, though they share 'a'.
    assert not a.may_communicate("high", "low")
    assert ("high", "low") in a.indirect_pairs  # through dom0 or guest
    # 'via' reaches 'guest' only through dom0.
    assert ("guest", "via") in a.indirect_pairs
    # Never-admitted labels are in no reachability pair.
    assert all("rival" not in p and "capped" not in p for p in a.indirect_pairs)


# --------------------------------------------------------------------------- brute force


def _edge(p: Policy, x: VmLabel, y: VmLabel) -> bool:
    if not (x.ste_types & y.ste_types):
        return False
    if x.mls is not None and y.mls is not None:
        return x.mls == y.mls
    return True


def _blocks(p: Policy, x: VmLabel) -> set[str]:
    out: set[str] = set()
    for cs in p.conflict_sets:
        if cs.types & x.cw_types:
            out |= cs.types - x.cw_types
    return out


def _conflict(p: Policy, x: VmLabel, y: VmLabel) -> bool:
    return x.name != y.name and bool((y.cw_types & _blocks(p, x)) or (x.cw_types & _blocks(p, y)))


def _dominates(p: Policy, a: MlsLabel, b: MlsLabel) -> bool:
    rank = p.mls_levels.index
    return rank(a.level) >= rank(b.level) and a.categories >= b.categories


def reference(p: Policy) -> dict[str, object]:
    """The definitions of the analysis module's docstring, computed naively."""
    vms = {v.name: v for v in p.vm_labels}
    boot = vms[p.bootstrap]
    adm = {
        n
        for n, v in vms.items()
        if n == p.bootstrap or (not _conflict(p, v, boot) and v.quota.max_domains != 0)
    }
    pairs = [tuple(sorted((x, y))) for x, y in combinations_with_replacement(sorted(vms), 2)]
    edges = {pr for pr in pairs if _edge(p, vms[pr[0]], vms[pr[1]])}
    conflicts = {pr for pr in pairs if _conflict(p, vms[pr[0]], vms[pr[1]])}
    live = {
        (x, y) for x, y in edges if x != y and x in adm and y in adm and (x, y) not in conflicts
    }
    # Transitive closure over live edges.
    reach = {(x, y) for x, y in live} | {(y, x) for x, y in live} | {(x, x) for x in adm}
    changed = True
    while changed:
        changed = False
        for x, y in list(reach):
            for y2, z in list(reach):
                if y == y2 and (x, z) not in reach:
                    reach.add((x, z))
                    changed = True
    indirect = {
        (x, y) for x in adm for y in adm if x < y and (x, y) in reach and (x, y) not in edges
    }
    talk = {x for x in adm if (x, x) in edges} | {n for pr in live for n in pr}
    users = {}
    for r in p.resource_labels:
        ok = set()
        for n in adm:
            v = vms[n]
            if r.ste_type not in v.ste_types:
                continue
            if v.mls is None or r.mls is None or _dominates(p, v.mls, r.mls):
                ok.add(n)  # read-only use is the weaker requirement
        users[r.name] = ok
    cw_in_adm = {t for n in adm for t in vms[n].cw_types}
    return {
        "ste_edges": edges,
        "cw_conflicts": conflicts,
        "admissible": adm,
        "indirect_pairs": indirect,
        "unused_ste_types": set(p.ste_types)
        - {t for v in p.vm_labels for t in v.ste_types}
        - {r.ste_type for r in p.resource_labels},
        "unused_cw_types": set(p.cw_types) - {t for v in p.vm_labels for t in v.cw_types},
        "inert_conflict_sets": {cs.name for cs in p.conflict_sets if len(cs.types & cw_in_adm) < 2},
        "never_admitted": set(vms) - adm,
        "mute": adm - talk,
        "isolated": {n for n in adm if n in talk and not any(n in pr for pr in live)},
        "unusable_resources": {n for n, u in users.items() if not u},
        "resource_users": users,
    }


def _observed(a: PolicyAnalysis) -> dict[str, object]:
    return {
        "ste_edges": set(a.ste_edges),
        "cw_conflicts": set(a.cw_conflicts),
        "admissible": set(a.admissible),
        "indirect_pairs": set(a.indirect_pairs),
        "unused_ste_types": set(a.unused_ste_types),
        "unused_cw_types": set(a.unused_cw_types),
        "inert_conflict_sets": set(a.inert_conflict_sets),
        "never_admitted": set(a.never_admitted),
        "mute": set(a.mute),
        "isolated": set(a.isolated),
        "unusable_resources": set(a.unusable_resources),
        "resource_users": {k: set(v) for k, v in a.resource_users.items()},
    }


@settings(max_examples=300, deadline=None)
@given(policies(acm=False, max_labels=8))
def test_analysis_agrees_with_brute_force(policy: Policy) -> None:
    assert _observed(analyse(policy)) == reference(policy)


@settings(max_examples=100, deadline=None)
@given(policies(acm=False, max_labels=8))
def test_edges_carry_the_common_types(policy: Policy) -> None:
    a = analyse(policy)
    for (x, y), types in a.ste_edges.items():
        vx, vy = policy.vm_label(x), policy.vm_label(y)
        assert vx is not None and vy is not None
        assert types == vx.ste_types & vy.ste_types and types


# --------------------------------------------------------------------------- DOT


def _render(dot: str) -> dict[str, object]:
    assert DOT is not None, "graphviz 'dot' is installed by scripts/install-deps.sh"
    out = subprocess.run(
        [DOT, "-Tjson"], input=dot.encode(), capture_output=True, check=False, timeout=30
    )
    assert out.returncode == 0, out.stderr.decode()
    parsed: dict[str, object] = json.loads(out.stdout)
    return parsed


def _text(obj: dict[str, object]) -> str:
    """The label text Graphviz actually drew for a node or edge."""
    ops = obj.get("_ldraw_", [])
    assert isinstance(ops, list)
    return "".join(op["text"] for op in ops if "text" in op)


def _graph(dot: str) -> tuple[set[str], list[tuple[str, str, dict[str, object]]]]:
    """(drawn node labels, [(tail label, head label, edge)]) as Graphviz parsed `dot`."""
    g = _render(dot)
    objs = g.get("objects", [])
    assert isinstance(objs, list)
    texts = [_text(o) for o in objs]
    edges = []
    for e in g.get("edges", []):  # type: ignore[attr-defined]
        edges.append((texts[e["tail"]], texts[e["head"]], e))
    return set(texts), edges


def _nodes(p: Policy, resources: bool = True) -> set[str]:
    out = {v.name for v in p.vm_labels}
    if resources:
        out |= {f"{r.name} [{r.ste_type}]" for r in p.resource_labels}
    return out


def _expected_edges(a: PolicyAnalysis) -> list[tuple[str, str]]:
    res = {r.name: f"{r.name} [{r.ste_type}]" for r in a.policy.resource_labels}
    exp = [(x, y) for x, y in a.ste_edges if x != y]
    exp += [(res[r], v) for r, us in a.resource_users.items() for v in us]
    exp += list(a.cw_conflicts)
    return exp


def test_dot_of_the_example_is_valid_graphviz_with_every_node_and_edge() -> None:
    a = analyse(acm_xml.load(CLIENT).policy)
    nodes, edges = _graph(a.to_dot())
    assert nodes == _nodes(a.policy)
    assert sorted((t, h) for t, h, _ in edges) == sorted(_expected_edges(a))
    red = [(t, h, _text(e)) for t, h, e in edges if e.get("color") == "red"]
    assert red == [("dom_Fun", "dom_HomeBanking", "Protection1")]


def test_dot_escapes_quotes_and_backslashes() -> None:
    p = Policy(
        name='we"ird\\',
        version=PolicyVersion(1, 0),
        bootstrap='d"0',
        ste_types=["t\\n"],
        vm_labels=[VmLabel('d"0', ["t\\n"]), VmLabel("b\\N", ["t\\n"])],
        resource_labels=[ResourceLabel("r\\", "t\\n")],
    )
    a = analyse(p)
    nodes, edges = _graph(a.to_dot())
    assert nodes == {'d"0', "b\\N", "r\\ [t\\n]"}
    (ste,) = [e for t, h, e in edges if e.get("style") != "dotted"]
    assert _text(ste) == "t\\n"  # drawn literally, not as a newline


def test_dot_without_resources_or_conflicts() -> None:
    a = analyse(acm_xml.load(CLIENT).policy)
    nodes, edges = _graph(a.to_dot(resources=False, conflicts=False))
    assert nodes == _nodes(a.policy, resources=False)
    assert len(edges) == len([1 for x, y in a.ste_edges if x != y])


@pytest.mark.slow
@settings(max_examples=25, deadline=None)
@given(policies(acm=True, max_labels=6))
def test_dot_of_random_policies_renders_with_every_edge(policy: Policy) -> None:
    a = analyse(policy)
    nodes, edges = _graph(a.to_dot())
    assert nodes == _nodes(policy)
    assert sorted(tuple(sorted((t, h))) for t, h, _ in edges) == sorted(
        tuple(sorted(pr)) for pr in _expected_edges(a)
    )
