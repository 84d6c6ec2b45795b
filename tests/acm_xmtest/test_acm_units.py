"""The pure parts behind the xm-test port: the label store through an update (renamed,
``INV_ACM``), dom0's stored label, ACM's DEFAULT policy and its exemption from the version
check, and the engine counting dom0."""

from __future__ import annotations

from pathlib import Path

import pytest
from xmtest_helpers import POLICIES

from shyped.core.engine import Engine
from shyped.core.labelstore import (
    LabelStore,
    LabelStoreError,
    load_label_store,
    parse_label_store,
    save_label_store,
)
from shyped.policy import acm_xml
from shyped.policy.acm_default import default_policy, is_default_policy
from shyped.policy.decisions import PolicyEngine
from shyped.policy.update import Reason, RunningDomain, RunningSystem, check_update

XM_TEST = acm_xml.loads((POLICIES / "xm-test-security_policy.xml").read_bytes())
UPDATE = acm_xml.loads((POLICIES / "xm-test-update-security_policy.xml").read_bytes())
DOM0 = RunningSystem([RunningDomain(0, "SystemManagement", "Domain-0")], [], [])


def test_an_update_renames_or_invalidates_resource_labels_as_acm_did() -> None:
    store = (
        LabelStore()
        .with_resource("file:/tmp/green", "green")
        .with_resource("file:/tmp/red", "red")
        .with_resource("file:/tmp/blue", "blue")
        .with_domain(name="web", label="green")
    )
    check = check_update(XM_TEST, UPDATE, DOM0)
    assert check.allowed, check.problems
    after = store.after_update(old_policy="xm-test", vm=check.maps.vm, resource=check.maps.resource)
    assert after.resources == {
        "disk:/tmp/green": "GREEN",
        "disk:/tmp/red": "RED",
        "disk:/tmp/blue": "INV_ACM:xm-test:blue",
    }
    assert after.by_name == {"web": "GREEN"}  # domain assignments follow renames
    # Already invalid stays invalid (and keeps its old policy) through the next update.
    reset = default_policy()
    check2 = check_update(UPDATE, reset, DOM0)
    again = after.after_update(
        old_policy="xm-test-update", vm=check2.maps.vm, resource=check2.maps.resource
    )
    assert again.resources["disk:/tmp/blue"] == "INV_ACM:xm-test:blue"
    assert again.resources["disk:/tmp/green"] == "INV_ACM:xm-test-update:GREEN"


def test_dom0_and_invalid_labels_round_trip_and_bad_ones_are_refused(tmp_path: Path) -> None:
    store = LabelStore(resources={"disk:/x": "INV_ACM:old.policy:blue"}).with_dom0("red")
    path = tmp_path / "labels.json"
    save_label_store(store, path)
    assert load_label_store(path) == store
    assert store.with_dom0(None).dom0 is None
    bad_entries = (
        '"dom0": "a b"',
        '"dom0": 7',
        '"resources": {"/x": "INV_ACM:p:a:b"}',
        '"resources": {"/x": "INV_ACM::blue"}',
        '"resources": {"/x": "ACM:p:blue"}',
    )
    for bad in bad_entries:
        with pytest.raises(LabelStoreError):
            parse_label_store('{"version": 1, ' + bad + "}")
    with pytest.raises(LabelStoreError):
        LabelStore().with_resource("/x", "INV_ACM:p:blue")  # only an update writes these
    with pytest.raises(LabelStoreError):
        LabelStore().with_dom0("x" * 200)


def test_the_default_policy_and_its_exemption_from_the_version_check() -> None:
    reset = default_policy("red")
    assert is_default_policy(reset) and not is_default_policy(XM_TEST)
    assert reset.vm_label("SystemManagement").from_name == "red"  # type: ignore[union-attr]
    same = default_policy("SystemManagement").vm_label("SystemManagement")
    assert same is not None and same.from_name is None
    red_dom0 = RunningSystem([RunningDomain(0, "red", "Domain-0")], [], [])
    to = check_update(XM_TEST, reset, red_dom0)
    assert to.allowed, to.problems
    assert str(to.domain_labels[0]) == "ACM:DEFAULT:SystemManagement"
    back = check_update(default_policy(), XM_TEST, DOM0)  # no FromPolicy: fine from DEFAULT
    assert back.allowed, back.problems
    # Between two ordinary policies the check stays.
    plain = check_update(XM_TEST, XM_TEST, DOM0)
    assert {p.reason for p in plain.problems} >= {Reason.FROM_POLICY, Reason.VERSION}
    # A labelled guest the DEFAULT lacks keeps the reset out.
    busy = RunningSystem([*DOM0.domains, RunningDomain(1, "green", "g")], [], [])
    assert [p.reason for p in check_update(XM_TEST, reset, busy).problems] == [Reason.LABEL]


def test_the_engine_counts_dom0_with_its_stored_label() -> None:
    engine = Engine(PolicyEngine(XM_TEST), LabelStore().with_dom0("blue"))
    assert engine.dom0_label() == "blue"
    assert not engine.running.admit("red").permitted  # blue dom0 blocks red (RER)
    assert engine.counted() == {}  # guests only
    unknown = Engine(PolicyEngine(XM_TEST), LabelStore().with_dom0("nope"))
    assert unknown.dom0_label() == "SystemManagement"  # a label the policy lacks: bootstrap
    assert unknown.running.admit("red").permitted
