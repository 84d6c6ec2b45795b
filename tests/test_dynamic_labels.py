"""Dynamic labels (docs/policy.md, "Dynamic labels"), pure: the policy's rules, the instance
identity, and the engine over the host model (no xenstore; events built by hand)."""

from __future__ import annotations

import json
from pathlib import Path

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from policy_helpers import policies
from test_engine import Host as EngineHost
from test_policytool import ctl

from shyped.core import audit
from shyped.core.audit import Party
from shyped.core.engine import Outcome
from shyped.core.events import (
    DeviceAdded,
    DeviceKey,
    DomainAppeared,
    DomainVanished,
    VchanPublished,
)
from shyped.core.instances import INSTANCE_HEX, Instance, Instances, instance_id, split_binding
from shyped.core.labelstore import (
    LabelStore,
    LabelStoreError,
    label_store_problems,
    parse_label_store,
)
from shyped.core.relabel import check_domain_relabel
from shyped.policy import acm_xml, convert, toml_format, update
from shyped.policy.analysis import analyse
from shyped.policy.decisions import Decision, Hook, PolicyEngine, Rule
from shyped.policy.errors import PolicyError
from shyped.policy.flask import compile_policy, type_name
from shyped.policy.model import Policy, VmLabel
from shyped.policy.query import can_talk
from shyped.policy.update import RunningDomain, RunningSystem

POLICY_TEXT = """\
[policy]
name = "dyn"
version = "1.0"
bootstrap = "dom0"

[types]
ste = ["sys", "tenant", "svc", "lab"]

[[label]]
name = "dom0"
ste = ["sys", "tenant", "svc", "lab"]

[[label]]
name = "tenant"
ste = ["tenant", "svc"]
dynamic = true

[[label]]
name = "lab"
ste = ["lab", "svc"]
dynamic = true
shared = ["lab"]

[[label]]
name = "dns"
ste = ["svc"]

[[label]]
name = "backup"
ste = ["tenant"]

[[resource]]
name = "tenant_disk"
ste = "tenant"
per_instance = true

[[resource]]
name = "lan"
ste = "tenant"
"""
POLICY = toml_format.loads(POLICY_TEXT)
A, B = "6f1b5c2e-0000-4000-8000-00000000000a", "6f1b5c2e-0000-4000-8000-00000000000b"


def store(**disks: str) -> LabelStore:
    s = LabelStore(
        by_name={"a": "tenant", "b": "tenant", "dns": "dns", "l1": "lab", "backup": "backup"}
    )
    s = s.with_resource("bridge:xenbr0", "lan")
    for path, label in disks.items():
        s = s.with_resource(f"/img/{path}.img", label)
    return s


# ---- the policy ----------------------------------------------------------------------------


def test_toml_round_trip_keeps_dynamic_shared_and_per_instance() -> None:
    again = toml_format.loads(toml_format.dumps(POLICY))
    assert again == POLICY
    tenant, lab = POLICY.vm_label("tenant"), POLICY.vm_label("lab")
    assert tenant is not None and tenant.dynamic and tenant.private_types == {"tenant", "svc"}
    assert lab is not None and lab.shared_types == {"lab"} and lab.private_types == {"svc"}
    disk = POLICY.resource_label("tenant_disk")
    assert disk is not None and disk.per_instance


def marked(text: str) -> int:
    """1-based line of the `# <-` marker: where the problem must be reported."""
    return next(i for i, line in enumerate(text.splitlines(), 1) if "# <-" in line)


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        (
            'shared = ["lab"]',
            'shared = ["sys"]  # <-',
            "VM label 'lab' shares STE type 'sys' it does not hold",
        ),
        (
            'ste = ["svc"]\n',
            'ste = ["svc"]\nshared = ["svc"]  # <-\n',
            "VM label 'dns' lists shared types but is not dynamic",
        ),
        (
            'ste = ["sys", "tenant", "svc", "lab"]\n\n[[label]]\nname = "tenant"',
            'ste = ["sys", "tenant", "svc", "lab"]\ndynamic = true  # <-\n\n[[label]]\n'
            'name = "tenant"',
            "VM label 'dom0' is the bootstrap label and cannot be dynamic",
        ),
        (
            'dynamic = true\n\n[[label]]\nname = "lab"',
            'dynamic = "yes"  # <-\n\n[[label]]\nname = "lab"',
            "label 'tenant': 'dynamic' must be true or false, not a string",
        ),
    ],
)
def test_bad_dynamic_declarations_are_reported_at_their_line(
    old: str, new: str, message: str
) -> None:
    assert old in POLICY_TEXT
    text = POLICY_TEXT.replace(old, new, 1)
    with pytest.raises(PolicyError) as err:
        toml_format.loads(text, file="p.toml")
    (problem,) = [p for p in err.value.problems if message in p.message]
    assert problem.line == marked(text)


def test_two_instances_share_no_private_type() -> None:
    eng = PolicyEngine(POLICY)
    apart = eng.channel(Hook.VCHAN, "tenant", "tenant")
    assert not apart.permitted and apart.rule is Rule.STE
    assert "private to each instance" in apart.reason
    # the shared service the template may talk to: still permitted
    assert eng.channel(Hook.VCHAN, "tenant", "dns").permitted
    assert eng.channel(Hook.DEVICE_CHANNEL, "tenant", "dom0").permitted
    # a shared type lets instances talk, through that type only
    lab = eng.channel(Hook.VCHAN, "lab", "lab")
    assert lab.permitted and lab.ste_types == {"lab"}
    # instances of two templates holding 'svc' privately: apart too
    assert not eng.channel(Hook.EVTCHN, "tenant", "lab").permitted


def test_analysis_says_instances_cannot_talk_to_each_other() -> None:
    a = analyse(POLICY)
    assert not a.may_communicate("tenant", "tenant") and a.may_communicate("lab", "lab")
    answer = can_talk(a, "tenant", "tenant")
    assert answer.verdict != "direct" and "private to each instance" in answer.reason
    assert can_talk(a, "tenant", "dns").verdict == "direct"


def test_acm_xml_refuses_dynamic_labels_at_their_lines() -> None:
    with pytest.raises(convert.ConvertRefused) as err:
        checked = toml_format.loads_checked(POLICY_TEXT, file="p.toml")
        convert.to_acm_xml(checked.policy, checked.line_of, "p.toml")
    lines = POLICY_TEXT.splitlines()
    dynamic = [i for i, line in enumerate(lines, 1) if line == "dynamic = true"]
    per_instance = lines.index("per_instance = true") + 1
    found = {(p.line, p.message.split(" (")[0]) for p in err.value.problems}
    assert found == {
        (dynamic[0], "ACM XML cannot express this: VM label 'tenant' is dynamic"),
        (dynamic[1], "ACM XML cannot express this: VM label 'lab' is dynamic"),
        (
            per_instance,
            "ACM XML cannot express this: resource label 'tenant_disk' is per instance; "
            "ACM XML has no dynamic labels",
        ),
    }
    with pytest.raises(acm_xml.AcmExportError):
        acm_xml.dumps(POLICY)


def test_flask_keeps_instances_of_a_template_apart_and_lets_each_talk_to_itself() -> None:
    flask = compile_policy(POLICY)
    t, lab, dns = type_name("tenant"), type_name("lab"), type_name("dns")
    assert (t, t) not in flask.comms and f"domain_self_comms({t})" in flask.module
    assert (lab, lab) in flask.comms
    assert tuple(sorted((t, dns))) in flask.comms


def test_relabel_neither_gives_nor_takes_a_dynamic_label() -> None:
    system = RunningSystem(
        (RunningDomain(0, "dom0", "Domain-0"), RunningDomain(3, "dns", "d")), (), ()
    )
    check = check_domain_relabel(PolicyEngine(POLICY), system, 3, "tenant")
    assert not check.allowed and "dynamic label" in check.reasons[0]


# ---- identity -------------------------------------------------------------------------------


def test_instance_id_is_derived_from_the_uuid_only() -> None:
    assert instance_id(A) == instance_id(A.upper()) and len(instance_id(A)) == INSTANCE_HEX
    assert instance_id(A) != instance_id(B)
    assert Instance.of("tenant", A).name == f"tenant#{instance_id(A)}"
    int(instance_id(A), 16)  # hex


def test_a_colliding_instance_id_is_refused_not_merged() -> None:
    inst = Instances()
    inst.claim(5, Instance("tenant", B, instance_id(A)))  # as if B hashed like A
    _, decision = inst.admission(POLICY, 6, "tenant", A)
    assert decision is not None and not decision.permitted and "domain 5" in decision.reason
    _, own = inst.admission(POLICY, 5, "tenant", B)  # asked again about the holder: fine
    assert own is None


def test_label_store_binds_resources_to_instances() -> None:
    s = store(a=f"tenant_disk@{A.upper()}")
    assert s.resource_binding("disk:/img/a.img") == ("tenant_disk", A)
    assert s.resource_label("disk:/img/a.img") == "tenant_disk"
    assert split_binding(f"x@{A}") == ("x", A)
    with pytest.raises(LabelStoreError):
        s.with_resource("/img/c.img", "tenant_disk@not-a-uuid")
    again = parse_label_store(s.to_json())
    assert again.resource_binding("disk:/img/a.img") == ("tenant_disk", A)
    renamed = s.renamed({}, {"tenant_disk": "disk2"})
    assert renamed.resource_binding("disk:/img/a.img") == ("disk2", A)
    bad = '{"version": 1, "resources": {"/img/x.img": "tenant_disk@nope"}}'
    assert "invalid label name" in label_store_problems(bad, "l.json", POLICY)[0].message


# ---- the engine -----------------------------------------------------------------------------


class Host(EngineHost):
    """test_engine's host (a host model, an engine, the daemon's loop) on this policy."""

    def __init__(self, labels: LabelStore) -> None:
        super().__init__(labels=labels, policy=PolicyEngine(POLICY))

    def start(self, domid: int, uuid: str, name: str) -> Outcome:
        (o,) = self.feed(DomainAppeared(domid, uuid, name))
        return o

    def disk(self, fe: int, img: str, devid: int = 51712) -> Outcome:
        key = DeviceKey("vbd", fe, devid)
        (o,) = self.feed(DeviceAdded(key, 0, "vbd", f"/img/{img}.img", True))
        return o

    def vchan(self, server: int, client: int) -> Outcome:
        path = f"/local/domain/{server}/data/vchan/{client}/1"
        (o,) = self.feed(VchanPublished(server, path, (client,), False, 8, 23))
        return o


def test_instances_are_decided_at_admission_and_shown_and_audited() -> None:
    h = Host(store())
    o = h.start(1, A, "a")
    assert o.allowed and o.subject.instance == f"tenant#{instance_id(A)}"
    assert o.subject.to_json()["instance"] == f"tenant#{instance_id(A)}"
    inst = h.engine.instance_of(1)
    assert inst is not None and inst.uuid == A
    assert h.start(3, "6f1b5c2e-0000-4000-8000-0000000000dd", "dns").subject.instance is None


def test_two_instances_cannot_share_a_vchan_but_both_reach_the_shared_service() -> None:
    h = Host(store())
    h.start(1, A, "a")
    h.start(2, B, "b")
    h.start(3, "6f1b5c2e-0000-4000-8000-0000000000dd", "dns")
    denied = h.vchan(1, 2)
    assert not denied.allowed and denied.decision.rule is Rule.STE
    assert denied.subject.instance == f"tenant#{instance_id(A)}"
    assert denied.peer is not None and denied.peer.instance == f"tenant#{instance_id(B)}"
    assert h.vchan(1, 3).allowed and h.vchan(3, 2).allowed


def test_each_instance_uses_its_own_disk_only() -> None:
    h = Host(store(a=f"tenant_disk@{A}", b=f"tenant_disk@{B}", loose="tenant_disk"))
    h.start(1, A, "a")
    h.start(2, B, "b")
    assert h.disk(1, "a").allowed
    theirs = h.disk(1, "b", 51728)
    assert not theirs.allowed and "is assigned to the instance of domain" in theirs.decision.reason
    assert theirs.resource is not None and theirs.resource.label == f"tenant_disk@{B}"
    loose = h.disk(2, "loose")
    assert not loose.allowed and "per instance" in loose.decision.reason
    # a shared resource of the template (the bridge) is for every instance
    key = DeviceKey("vif", 2, 0)
    (vif,) = h.feed(DeviceAdded(key, 0, "vif", "xenbr0", True))
    assert vif.allowed


def test_a_disk_bound_to_an_instance_is_nobody_elses() -> None:
    h = Host(store(a=f"tenant_disk@{A}"))
    h.start(1, "6f1b5c2e-0000-4000-8000-0000000000dd", "backup")  # holds 'tenant', static
    assert PolicyEngine(POLICY).resource("backup", "tenant_disk", writable=True).permitted
    o = h.disk(1, "a")
    assert not o.allowed and "(not an instance)" in o.decision.reason


def test_instance_released_at_destroy_same_uuid_same_instance_new_uuid_new_one() -> None:
    h = Host(store())
    first = h.start(1, A, "a").subject.instance
    h.feed(DomainVanished(1))
    assert h.engine.instance_of(1) is None
    again = h.start(4, A, "a").subject.instance
    assert again == first
    h.feed(DomainVanished(4))
    other = h.start(5, B, "a").subject.instance
    assert other is not None and other != first


def test_an_instance_id_held_by_a_running_domain_denies_admission() -> None:
    h = Host(store())
    h.start(1, A, "a")
    # force a collision: pretend domain 1's instance has B's id
    h.engine._instances.claim(1, Instance("tenant", A, instance_id(B)))
    o = h.start(2, B, "b")
    assert not o.allowed and o.decision.rule is Rule.LABEL and "already held" in o.decision.reason
    assert h.engine.instance_of(2) is None and h.engine.counted().get(2) is None


# ---- the offline policy tool, as an operator runs it ----------------------------------------


def test_policy_tool_explains_instances_and_refuses_acm_xml(tmp_path: Path) -> None:
    f = tmp_path / "dyn.toml"
    f.write_text(POLICY_TEXT)
    code, out, _ = ctl("policy", "can", str(f), "tenant", "tenant")
    assert code == 1 and "private to each instance" in out, out
    assert ctl("policy", "can", str(f), "tenant", "dns")[0] == 0
    code, out, _ = ctl("policy", "analyse", str(f))
    assert code == 0 and "dynamic, instances cannot talk to each other: tenant" in out
    code, out, _ = ctl("--json", "policy", "analyse", str(f))
    assert json.loads(out)["dynamic"]["tenant"] == {"shared": [], "instances_apart": True}
    assert ctl("policy", "lint", str(f))[0] == 0
    f.write_text(POLICY_TEXT.replace('ste = "tenant"\nper_instance', 'ste = "sys"\nper_instance'))
    code, out, _ = ctl("policy", "lint", "--strict", str(f))
    line = POLICY_TEXT.splitlines().index('name = "tenant_disk"') + 1
    assert (
        code == 1
        and (
            f"{f}:{line}: warning: resource label 'tenant_disk' is unusable: it is per instance, "
            "and no dynamic VM label carries its STE type 'sys'"
        )
        in out
    ), out
    f.write_text(POLICY_TEXT)
    code, _, err = ctl("policy", "convert", str(f), "--to", "acm-xml")
    line = POLICY_TEXT.splitlines().index("dynamic = true") + 1
    assert code == 1 and f"{f}:{line}: ACM XML cannot express this: VM label 'tenant'" in err


def test_denial_lines_and_human_lines_name_the_instances() -> None:
    inst_a, inst_b = Instance.of("tenant", A).name, Instance.of("tenant", B).name
    draft = audit.decision_draft(
        Decision(False, Hook.VCHAN, Rule.STE, "apart"),
        "2026-01-01T00:00:00.000000Z",
        subject=Party("t1", 3, A, "ACM:dyn:tenant", instance=inst_a),
        obj=Party("t2", 4, B, "ACM:dyn:tenant", instance=inst_b),
        mode="enforcing",
    )
    rec = audit.seal(draft, log="0123456789abcdef0123456789abcdef", seq=7, prev=audit.GENESIS)
    line = audit.format_denial(rec)
    assert f"sinstance={inst_a}" in line and f"tinstance={inst_b}" in line
    assert f"t1(3 {inst_a}) -> t2(4 {inst_b})" in audit.format_human(rec)


# ---- policy switch --------------------------------------------------------------------------


def switched(h: Host, new: Policy) -> update.UpdateCheck:
    check = update.check_update(h.engine.policy.policy, new, h.engine.running_system(h.model))
    if check.allowed:
        h.engine.switch_policy(PolicyEngine(new), check)
        h.engine.begin_sweep(h.model)
        h.decide(h.model.all_needs())
        h.engine.end_sweep()
    return check


def next_version(policy: Policy, **labels: VmLabel) -> Policy:
    return attrs.evolve(
        policy,
        version=attrs.evolve(policy.version, minor=policy.version.minor + 1),
        from_policy=policy.ref,
        vm_labels=tuple(labels.get(v.name, v) for v in policy.vm_labels),
    )


def test_a_switch_keeps_instances_renames_them_and_releases_those_no_longer_dynamic() -> None:
    h = Host(store())
    before = h.start(1, A, "a").subject.instance
    tenant = POLICY.vm_label("tenant")
    assert tenant is not None
    renamed = attrs.evolve(tenant, name="customer", from_name="tenant")
    check = switched(h, next_version(POLICY, tenant=renamed))
    assert check.allowed, str(check)
    inst = h.engine.instance_of(1)
    assert inst is not None and inst.ident == instance_id(A) and inst.template == "customer"
    assert before == f"tenant#{inst.ident}"
    static = attrs.evolve(renamed, name="customer", from_name=None, dynamic=False)
    assert switched(h, next_version(h.engine.policy.policy, customer=static)).allowed
    assert h.engine.instance_of(1) is None


def test_a_switch_that_makes_talking_domains_instances_is_refused() -> None:
    dns = POLICY.vm_label("dns")
    assert dns is not None
    h = Host(LabelStore(by_name={"a": "dns", "b": "dns"}))
    h.start(1, A, "a")
    h.start(2, B, "b")
    assert h.vchan(1, 2).allowed
    check = switched(h, next_version(POLICY, dns=attrs.evolve(dns, dynamic=True)))
    assert not check.allowed and "private to each instance" in str(check)
    assert h.engine.instance_of(1) is None  # nothing changed


def test_a_label_made_dynamic_gives_running_domains_their_instances_at_the_sweep() -> None:
    dns = POLICY.vm_label("dns")
    assert dns is not None
    h = Host(LabelStore(by_name={"a": "dns"}))
    h.start(1, A, "a")
    assert switched(h, next_version(POLICY, dns=attrs.evolve(dns, dynamic=True))).allowed
    inst = h.engine.instance_of(1)
    assert inst is not None and inst.name == f"dns#{instance_id(A)}"


def test_policy_diff_names_dynamic_and_per_instance_changes(tmp_path: Path) -> None:
    old, new = tmp_path / "old.toml", tmp_path / "new.toml"
    static = 'dynamic = true\n\n[[label]]\nname = "lab"'
    old.write_text(POLICY_TEXT.replace(static, '\n[[label]]\nname = "lab"'))
    new.write_text(POLICY_TEXT.replace("per_instance = true\n", ""))
    code, out, _ = ctl("policy", "diff", str(old), str(new))
    assert code == 1
    changes = out.split("\n\n")[0].splitlines()
    assert changes == [
        "~ VM label tenant: dynamic",
        "~ resource label tenant_disk: no longer per instance",
    ]


def test_dom0_never_runs_as_an_instance() -> None:
    h = Host(attrs.evolve(store(), dom0="tenant"))
    assert h.engine.dom0_label() == "dom0"
    h = Host(attrs.evolve(store(), dom0="backup"))
    assert h.engine.dom0_label() == "backup"
    backup = POLICY.vm_label("backup")
    assert backup is not None
    check = switched(h, next_version(POLICY, backup=attrs.evolve(backup, dynamic=True)))
    assert check.allowed and h.engine.dom0_label() == "dom0"


def test_label_store_check_warns_of_a_per_instance_label_assigned_to_no_instance() -> None:
    text = store(a=f"tenant_disk@{A}", loose="tenant_disk").to_json()
    problems = label_store_problems(text, "labels.json", POLICY)
    assert [(p.severity, p.message) for p in problems] == [
        (
            "warning",
            "resource disk:/img/loose.img: label 'tenant_disk' is per instance: assign it to "
            "one instance as tenant_disk@<uuid> (as it is, no domain may use it)",
        )
    ]
    line = text.splitlines().index('    "disk:/img/loose.img": "tenant_disk"') + 1
    assert problems[0].line == line


@settings(max_examples=200, deadline=None)
@given(policy=policies(mls=False), data=st.data())
def test_property_instances_talk_only_through_a_type_not_private_to_both(
    policy: Policy, data: st.DataObject
) -> None:
    """Any policy with some labels made dynamic (each with some shared types): two domains talk
    iff a common type is not private to both; symmetric; static pairs are unchanged."""
    labels = []
    for v in policy.vm_labels:
        dynamic = v.name != policy.bootstrap and data.draw(st.booleans())
        shared = (
            data.draw(st.frozensets(st.sampled_from(sorted(v.ste_types))))
            if (dynamic and v.ste_types)
            else frozenset()
        )
        labels.append(attrs.evolve(v, dynamic=dynamic, shared_types=shared))
    dyn = attrs.evolve(policy, vm_labels=labels)
    eng, plain = PolicyEngine(dyn), PolicyEngine(policy)
    for a in labels:
        for b in labels:
            d = eng.channel(Hook.VCHAN, a.name, b.name)
            assert d.permitted == eng.channel(Hook.VCHAN, b.name, a.name).permitted
            usable = (a.ste_types & b.ste_types) - (a.private_types & b.private_types)
            assert d.permitted == bool(usable)
            if not (a.dynamic and b.dynamic):
                assert d.permitted == plain.channel(Hook.VCHAN, a.name, b.name).permitted
