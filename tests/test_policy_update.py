"""Policy update check: concrete ACM scenarios and a brute-force reference (hypothesis)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import attrs
import pytest
from acm_helpers import policies
from hypothesis import event, given, settings
from hypothesis import strategies as st

from shyped.policy import acm_xml
from shyped.policy.model import (
    ConflictSet,
    Defaults,
    LabelRef,
    MlsLabel,
    Policy,
    PolicyRef,
    PolicyVersion,
    ResourceLabel,
    VmLabel,
)
from shyped.policy.update import (
    LiveChannel,
    Reason,
    ResourceInUse,
    RunningDomain,
    RunningSystem,
    check_update,
    label_maps,
)

CLIENT = Path(__file__).parent / "acm" / "client_v1-security_policy.xml"


def client() -> Policy:
    return acm_xml.load(CLIENT).policy


def successor(p: Policy, **changes: Any) -> Policy:
    """`p` as its own next version (FromPolicy and version set as ACM requires)."""
    base: dict[str, Any] = {
        "version": PolicyVersion(p.version.major, p.version.minor + 1),
        "from_policy": p.ref,
    }
    base.update(changes)
    return attrs.evolve(p, **base)


def replace_vm(p: Policy, name: str, new: VmLabel | None) -> list[VmLabel]:
    out = [v for v in p.vm_labels if v.name != name]
    if new is not None:
        out.append(new)
    return out


# A host under client_v1: dom0, a banking VM with its disk on the storage domain and its
# network through the network domain, two BOINC clients (no fun VM: it conflicts with banking).
HOST = RunningSystem(
    domains=[
        RunningDomain(0, "SystemManagement", "Domain-0"),
        RunningDomain(1, "dom_StorageDomain", "storage"),
        RunningDomain(2, "dom_NetworkDomain", "net"),
        RunningDomain(3, "ACM:example.client_v1:dom_HomeBanking", "bank"),
        RunningDomain(4, LabelRef("example.client_v1", "dom_BoincClient"), "boinc"),
        RunningDomain(5, "dom_BoincClient", "boinc2"),
    ],
    channels=[
        LiveChannel(3, 1, "vbd"),
        LiveChannel(3, 2, "vif"),
        LiveChannel(4, 2, "vif"),
        LiveChannel(5, 0, "console"),
        LiveChannel(3, 0, "grant", writable=False),
    ],
    resources=[
        ResourceInUse(1, "res_HardDrive(hda)", True, "/dev/sda"),
        ResourceInUse(3, "res_LogicalDiskPartition1(hda1)", True, "/dev/sda1"),
        ResourceInUse(2, "res_EthernetCard", True, "eth0"),
    ],
)


# --------------------------------------------------------------------------- scenarios


def test_client_host_is_accepted_by_its_own_successor() -> None:
    cur = client()
    check = check_update(cur, successor(cur), HOST)
    assert check.allowed, str(check)
    assert check.maps.vm_renames == {} and check.maps.vm_deleted == frozenset()
    assert check.domain_labels[3] == LabelRef("example.client_v1", "dom_HomeBanking")
    assert "allowed" in str(check)


def test_version_and_from_policy_are_required_as_acm_did() -> None:
    cur = client()
    same = check_update(cur, cur, HOST)
    assert {p.reason for p in same.problems} == {Reason.FROM_POLICY, Reason.VERSION}
    assert "has no FromPolicy" in str(same) and "not greater" in str(same)
    other = successor(cur, from_policy=PolicyRef("example.client_v1", PolicyVersion(0, 9)))
    bad = check_update(cur, other, HOST)
    assert [p.reason for p in bad.problems] == [Reason.FROM_POLICY]
    assert "updates example.client_v1 0.9" in bad.problems[0].message
    older = successor(cur, version=PolicyVersion(0, 99))
    assert [p.reason for p in check_update(cur, older, HOST).problems] == [Reason.VERSION]
    # Renaming the policy itself is fine when FromPolicy names the current one.
    renamed = successor(cur, name="example.client_v2")
    check = check_update(cur, renamed, HOST)
    assert check.allowed
    assert check.domain_labels[4] == LabelRef("example.client_v2", "dom_BoincClient")


def test_deleting_a_label_in_use_is_refused_and_names_the_domain() -> None:
    cur = client()
    new = successor(cur, vm_labels=replace_vm(cur, "dom_BoincClient", None))
    check = check_update(cur, new, HOST)
    assert not check.allowed
    assert [(p.reason, p.domains, p.labels) for p in check.problems] == [
        (Reason.LABEL, (4,), ("dom_BoincClient",)),
        (Reason.LABEL, (5,), ("dom_BoincClient",)),
    ]
    assert "'boinc' (4)" in check.problems[0].message and "deletes" in check.problems[0].message
    # The same deletion is fine when no domain uses the label.
    idle = RunningSystem([d for d in HOST.domains if d.domid < 4], HOST.channels[:2], [])
    assert check_update(cur, new, idle).allowed


def test_from_rename_is_followed_and_reported_in_the_map() -> None:
    cur = client()
    boinc = cur.vm_label("dom_BoincClient")
    assert boinc is not None
    seti = attrs.evolve(boinc, name="dom_Seti", from_name="dom_BoincClient")
    new = successor(cur, vm_labels=replace_vm(cur, "dom_BoincClient", seti))
    check = check_update(cur, new, HOST)
    assert check.allowed, str(check)
    assert check.maps.vm_renames == {"dom_BoincClient": "dom_Seti"}
    assert check.domain_labels[4] == LabelRef("example.client_v1", "dom_Seti")
    assert check.domain_labels[5] == LabelRef("example.client_v1", "dom_Seti")


def test_rename_from_an_unknown_label_is_refused() -> None:
    cur = client()
    fun = cur.vm_label("dom_Fun")
    assert fun is not None
    new = successor(cur, vm_labels=replace_vm(cur, "dom_Fun", attrs.evolve(fun, from_name="nope")))
    check = check_update(cur, new, HOST)
    assert [(p.reason, p.labels) for p in check.problems] == [(Reason.BAD_RENAME, ("nope",))]


def test_from_wins_over_a_label_keeping_the_old_name() -> None:
    # New 'dom_Fun' is a different label; domains labelled dom_Fun go to 'dom_Games'.
    cur = client()
    fun = cur.vm_label("dom_Fun")
    assert fun is not None
    labels = [*cur.vm_labels, attrs.evolve(fun, name="dom_Games", from_name="dom_Fun")]
    maps = label_maps(cur, successor(cur, vm_labels=labels))
    assert maps.vm["dom_Fun"] == "dom_Games"


def test_new_conflict_set_among_running_domains_is_refused_per_label_pair() -> None:
    cur = client()
    sets = [*cur.conflict_sets, ConflictSet("NoDonations", ["cw_Sensitive", "cw_Isolated"])]
    new = successor(cur, conflict_sets=sets)
    check = check_update(cur, new, HOST)
    (p,) = check.problems
    assert p.reason is Reason.CHINESE_WALL
    assert p.labels == ("dom_BoincClient", "dom_HomeBanking") and p.domains == (3, 4, 5)
    assert "'NoDonations'" in p.message


def test_running_domains_already_in_the_old_conflict_set_are_refused() -> None:
    # Banking (cw_Sensitive) and Fun (cw_Distrusted) could never have run together under
    # client_v1; a running set that has them both (e.g. started before) is refused too.
    cur = client()
    fun_bank = RunningSystem(
        [RunningDomain(3, "dom_HomeBanking"), RunningDomain(4, "dom_Fun")], [], []
    )
    (p,) = check_update(cur, successor(cur), fun_bank).problems
    assert p.reason is Reason.CHINESE_WALL and "'Protection1'" in p.message


def test_live_channel_that_loses_its_common_type_is_refused() -> None:
    cur = client()
    storage = cur.vm_label("dom_StorageDomain")
    assert storage is not None
    narrowed = attrs.evolve(storage, ste_types=storage.ste_types - {"ste_PersonalFinances"})
    new = successor(cur, vm_labels=replace_vm(cur, "dom_StorageDomain", narrowed))
    (p,) = check_update(cur, new, HOST).problems
    assert p.reason is Reason.CHANNEL and p.index == 0 and p.domains == (3, 1)
    assert "vbd" in p.message and "share no STE type" in p.message


def test_resource_that_loses_its_type_or_label_is_refused() -> None:
    cur = client()
    res = [
        attrs.evolve(r, ste_type="ste_InternetInsecure")
        if r.name == "res_LogicalDiskPartition1(hda1)"
        else r
        for r in cur.resource_labels
        if r.name != "res_EthernetCard"
    ]
    check = check_update(cur, successor(cur, resource_labels=res), HOST)
    assert [(p.reason, p.index) for p in check.problems] == [
        (Reason.RESOURCE, 1),
        (Reason.RESOURCE, 2),
    ]
    assert "lacks STE type 'ste_InternetInsecure'" in check.problems[0].message
    assert "'eth0'" in check.problems[1].message and "deletes" in check.problems[1].message


def test_every_reason_is_reported_at_once() -> None:
    cur = client()
    storage = cur.vm_label("dom_StorageDomain")
    assert storage is not None
    vms = replace_vm(cur, "dom_BoincClient", None)
    vms = [v for v in vms if v.name != "dom_StorageDomain"]
    vms.append(attrs.evolve(storage, ste_types={"ste_PersistentStorageA"}))
    res = [r for r in cur.resource_labels if r.name != "res_EthernetCard"]
    new = attrs.evolve(cur, vm_labels=vms, resource_labels=res)  # no version bump, FromPolicy
    check = check_update(cur, new, HOST)
    assert [p.reason for p in check.problems] == [
        Reason.FROM_POLICY,
        Reason.VERSION,
        Reason.LABEL,
        Reason.LABEL,
        Reason.CHANNEL,
        Reason.RESOURCE,
    ]


def test_unlabelled_domains_follow_the_new_defaults() -> None:
    cur = Policy(
        name="p",
        version=PolicyVersion(1, 0),
        bootstrap="dom0",
        ste_types=["s"],
        vm_labels=[VmLabel("dom0", ["s"]), VmLabel("guest", ["s"])],
        defaults=Defaults(unlabelled_domain="guest"),
    )
    system = RunningSystem([RunningDomain(0, "dom0"), RunningDomain(7, None, "anon")], [], [])
    ok = check_update(cur, successor(cur), system)
    assert ok.allowed and ok.domain_labels[7] is None
    deny = check_update(cur, successor(cur, defaults=Defaults()), system)
    (p,) = deny.problems
    assert p.reason is Reason.LABEL and p.domains == (7,) and "unlabelled" in p.message


def test_mls_is_part_of_the_channel_check() -> None:
    cur = Policy(
        name="p",
        version=PolicyVersion(1, 0),
        bootstrap="dom0",
        ste_types=["s"],
        vm_labels=[VmLabel("dom0", ["s"]), VmLabel("a", ["s"]), VmLabel("b", ["s"])],
        mls_levels=["low", "high"],
    )
    system = RunningSystem(
        [RunningDomain(1, "a"), RunningDomain(2, "b")], [LiveChannel(1, 2, "vchan")], []
    )
    new = successor(
        cur,
        vm_labels=[
            VmLabel("dom0", ["s"]),
            VmLabel("a", ["s"], mls=MlsLabel("low")),
            VmLabel("b", ["s"], mls=MlsLabel("high")),
        ],
    )
    (p,) = check_update(cur, new, system).problems
    assert p.reason is Reason.CHANNEL and "equal MLS labels" in p.message


def test_labels_of_another_policy_or_unknown_labels_are_problems() -> None:
    cur = client()
    system = RunningSystem(
        [
            RunningDomain(1, "ACM:other:dom_Fun"),
            RunningDomain(2, "no_such"),
            RunningDomain(3, "A:"),
        ],
        [],
        [],
    )
    check = check_update(cur, successor(cur), system)
    assert [p.domains for p in check.problems] == [(1,), (2,), (3,)]
    assert "not the current 'example.client_v1'" in check.problems[0].message
    assert "not a VM label of the current policy" in check.problems[1].message


def test_running_system_rejects_inconsistent_input() -> None:
    with pytest.raises(ValueError, match="twice"):
        RunningSystem([RunningDomain(1, "a"), RunningDomain(1, "b")])
    with pytest.raises(ValueError, match="not running"):
        RunningSystem([RunningDomain(1, "a")], [LiveChannel(1, 2, "vif")])
    with pytest.raises(ValueError, match="not running"):
        RunningSystem([RunningDomain(1, "a")], [], [ResourceInUse(9, "r", True)])


# --------------------------------------------------------------------------- brute force


def _ref_name(spec: object, policy_name: str) -> str | None:
    """The label name a spec denotes under the current policy, or None if malformed/foreign."""
    if isinstance(spec, LabelRef):
        return spec.label if spec.policy == policy_name else None
    assert isinstance(spec, str)
    if ":" not in spec:
        return spec
    parts = spec.split(":")
    if len(parts) != 3 or parts[0] != "ACM" or parts[1] != policy_name or not parts[2]:
        return None
    return parts[2]


def _renamed(old: str, new_labels: list[tuple[str, str | None]]) -> str | None:
    for name, frm in new_labels:
        if frm == old:
            return name
    return old if any(name == old for name, _ in new_labels) else None


def _dominates(p: Policy, a: MlsLabel, b: MlsLabel) -> bool:
    return (
        p.mls_levels.index(a.level) >= p.mls_levels.index(b.level) and a.categories >= b.categories
    )


def _blocked_by(p: Policy, lab: VmLabel) -> set[str]:
    out: set[str] = set()
    for cs in p.conflict_sets:
        if cs.types & lab.cw_types:
            out |= cs.types - lab.cw_types
    return out


def reference(cur: Policy, new: Policy, system: RunningSystem) -> set[tuple[object, ...]]:
    """Every refusal key, recomputed from scratch with plain set operations."""
    keys: set[tuple[object, ...]] = set()
    fp = new.from_policy
    if fp is None or fp.name != cur.name or fp.version != cur.version:
        keys.add((Reason.FROM_POLICY, (), (), None))
    if (new.version.major, new.version.minor) <= (cur.version.major, cur.version.minor):
        keys.add((Reason.VERSION, (), (), None))
    old_vm = {v.name for v in cur.vm_labels}
    old_res = {r.name for r in cur.resource_labels}
    for v in new.vm_labels:
        if v.from_name is not None and v.from_name not in old_vm:
            keys.add((Reason.BAD_RENAME, (), (v.from_name,), None))
    for rl in new.resource_labels:
        if rl.from_name is not None and rl.from_name not in old_res:
            keys.add((Reason.BAD_RENAME, (), (rl.from_name,), None))
    vm_pairs = [(v.name, v.from_name) for v in new.vm_labels]
    res_pairs = [(r.name, r.from_name) for r in new.resource_labels]
    new_vm = {v.name: v for v in new.vm_labels}
    new_res = {r.name: r for r in new.resource_labels}

    lab: dict[int, VmLabel] = {}
    for d in system.domains:
        if d.label is None:
            default = new.defaults.unlabelled_domain
            if default is None:
                keys.add((Reason.LABEL, (d.domid,), (), None))
            else:
                lab[d.domid] = new_vm[default]
            continue
        name = _ref_name(d.label, cur.name)
        if name is None or name not in old_vm:
            keys.add((Reason.LABEL, (d.domid,), (str(d.label),), None))
            continue
        target = _renamed(name, vm_pairs)
        if target is None:
            keys.add((Reason.LABEL, (d.domid,), (name,), None))
            continue
        lab[d.domid] = new_vm[target]

    # Chinese Wall: start any two running domains one after the other, in both orders.
    ids = [d.domid for d in system.domains if d.domid in lab]
    for i, x in enumerate(ids):
        for y in ids[i + 1 :]:
            a, b = lab[x], lab[y]
            if (b.cw_types & _blocked_by(new, a)) or (a.cw_types & _blocked_by(new, b)):
                n1, n2 = sorted((a.name, b.name))
                members = tuple(sorted(k for k in ids if lab[k].name in (n1, n2)))
                keys.add((Reason.CHINESE_WALL, members, (n1, n2), None))

    for i, c in enumerate(system.channels):
        if c.dom_a not in lab or c.dom_b not in lab:
            continue
        a, b = lab[c.dom_a], lab[c.dom_b]
        ok = bool(a.ste_types & b.ste_types)
        if ok and a.mls is not None and b.mls is not None:
            if c.kind == "grant" and not c.writable:
                ok = _dominates(new, a.mls, b.mls)
            else:
                ok = a.mls == b.mls
        if not ok:
            keys.add((Reason.CHANNEL, (c.dom_a, c.dom_b), (), i))

    for i, r in enumerate(system.resources):
        if r.domid not in lab:
            continue
        dl = lab[r.domid]
        res: ResourceLabel | None
        if r.label is None:
            default = new.defaults.unlabelled_resource
            res = None if default is None else new_res[default]
        else:
            name = _ref_name(r.label, cur.name)
            target = _renamed(name, res_pairs) if name is not None and name in old_res else None
            res = None if target is None else new_res[target]
        ok = res is not None and res.ste_type in dl.ste_types
        if ok and res is not None and dl.mls is not None and res.mls is not None:
            ok = dl.mls == res.mls if r.writable else _dominates(new, dl.mls, res.mls)
        if not ok:
            keys.add((Reason.RESOURCE, (r.domid,), (), i))
    return keys


POOLS = {
    "ste_pool": ["s1", "s2", "s3"],
    "cw_pool": ["c1", "c2", "c3", "c4"],
    "label_pool": ["A", "B", "C", "D", "E"],
    "res_pool": ["r1", "r2", "r3"],
}
KINDS = ["vbd", "vif", "console", "vchan", "evtchn", "grant"]


@st.composite
def systems(draw: st.DrawFn, cur: Policy) -> RunningSystem:
    vm_names = [v.name for v in cur.vm_labels]
    res_names = [r.name for r in cur.resource_labels]
    domids = draw(st.lists(st.integers(0, 30), unique=True, max_size=7))

    def vm_spec() -> object:
        name = st.sampled_from(vm_names)
        return draw(
            st.one_of(
                name,
                name,
                name.map(lambda n: f"ACM:{cur.name}:{n}"),
                name.map(lambda n: LabelRef(cur.name, n)),
                st.none(),
                st.sampled_from(["nope", "ACM:other:A", "ACM::"]),
            )
        )

    def res_spec() -> object:
        choices: list[st.SearchStrategy[object]] = [
            st.none(),
            st.sampled_from(["r9", f"ACM:{cur.name}:zz"]),
        ]
        if res_names:
            name = st.sampled_from(res_names)
            choices += [name, name, name.map(lambda n: f"ACM:{cur.name}:{n}")]
        return draw(st.one_of(*choices))

    domains = [RunningDomain(d, vm_spec()) for d in domids]  # type: ignore[arg-type]
    channels: list[LiveChannel] = []
    resources: list[ResourceInUse] = []
    if domids:
        ids = st.sampled_from(domids)
        for _ in range(draw(st.integers(0, 6))):
            channels.append(
                LiveChannel(draw(ids), draw(ids), draw(st.sampled_from(KINDS)), draw(st.booleans()))
            )
        for _ in range(draw(st.integers(0, 4))):
            resources.append(ResourceInUse(draw(ids), res_spec(), draw(st.booleans())))  # type: ignore[arg-type]
    return RunningSystem(domains, channels, resources)


@st.composite
def update_cases(draw: st.DrawFn) -> tuple[Policy, Policy, RunningSystem]:
    cur = draw(policies(acm=False, name="cur", **POOLS))  # type: ignore[arg-type]
    new = draw(policies(acm=False, name=draw(st.sampled_from(["cur", "next"])), **POOLS))  # type: ignore[arg-type]
    # Mostly a well-formed successor, so that the interesting checks decide.
    if draw(st.integers(0, 9)) < 8:
        bump = draw(st.sampled_from([(0, 1), (1, 0), (0, 0)]))
        new = attrs.evolve(
            new,
            from_policy=cur.ref,
            version=PolicyVersion(cur.version.major + bump[0], cur.version.minor + bump[1]),
        )
    return cur, new, draw(systems(cur))


@settings(max_examples=400, deadline=None)
@given(update_cases())
def test_update_check_agrees_with_brute_force(case: tuple[Policy, Policy, RunningSystem]) -> None:
    cur, new, system = case
    check = check_update(cur, new, system)
    keys = [p.key for p in check.problems]
    assert len(keys) == len(set(keys)), "a reason reported twice"
    expected = reference(cur, new, system)
    event("allowed" if not expected else "refused")
    assert check.allowed == (not expected)
    assert set(keys) == expected
    # Every domain whose label survives gets its new label, and only those.
    label_problem = {p.domains[0] for p in check.problems if p.reason is Reason.LABEL}
    assert set(check.domain_labels) == {d.domid for d in system.domains} - label_problem


@settings(max_examples=100, deadline=None)
@given(st.data())
def test_an_unchanged_successor_keeps_every_label_and_checks_only_the_running_system(
    data: st.DataObject,
) -> None:
    cur = data.draw(policies(acm=False, name="cur", **POOLS))  # type: ignore[arg-type]
    cur = attrs.evolve(
        cur,
        vm_labels=[attrs.evolve(v, from_name=None) for v in cur.vm_labels],
        resource_labels=[attrs.evolve(r, from_name=None) for r in cur.resource_labels],
    )
    system = data.draw(systems(cur))
    check = check_update(cur, successor(cur), system)
    assert {p.reason for p in check.problems} <= {
        Reason.LABEL,
        Reason.CHINESE_WALL,
        Reason.CHANNEL,
        Reason.RESOURCE,
    }
    assert dict(check.maps.vm) == {v.name: v.name for v in cur.vm_labels}
    assert check.maps.vm_deleted == frozenset() == check.maps.resource_deleted
    for d in system.domains:
        if d.domid in check.domain_labels:
            ref = check.domain_labels[d.domid]
            assert (ref is None) == (d.label is None)
            assert ref is None or ref.label == _ref_name(d.label, cur.name)
