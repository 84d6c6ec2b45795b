"""The policy model: label strings, versions, whole-policy validation, immutability."""

from __future__ import annotations

import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st

from shyped.policy.errors import LabelSyntaxError, PolicyError
from shyped.policy.model import (
    ConflictSet,
    LabelRef,
    Policy,
    PolicyVersion,
    ResourceLabel,
    VmLabel,
    name_problem,
)

names = st.text(
    st.characters(blacklist_categories=("Cc", "Cs", "Zs", "Zl", "Zp"), blacklist_characters=":"),
    min_size=1,
    max_size=30,
).filter(lambda s: name_problem(s, "x") is None)


@given(names, names)
def test_label_string_round_trips(policy: str, label: str) -> None:
    ref = LabelRef(policy, label)
    assert str(ref) == f"ACM:{policy}:{label}"
    assert LabelRef.parse(str(ref)) == ref


def test_label_string_as_xen_acm_wrote_it() -> None:
    ref = LabelRef.parse("ACM:example.client_v1:res_HardDrive(hda)")
    assert (ref.policy, ref.label) == ("example.client_v1", "res_HardDrive(hda)")


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("example:dom_Fun", "is not of the form ACM:<policy>:<label>"),
        ("ACM:a:b:c", "is not of the form ACM:<policy>:<label>"),
        ("FLASK:pol:lab", "has policy type 'FLASK', expected 'ACM'"),
        ("ACM::lab", "policy name must not be empty"),
        ("ACM:pol:", "label name must not be empty"),
        ("ACM:pol:two words", "contains whitespace or control characters"),
    ],
)
def test_malformed_label_strings(text: str, why: str) -> None:
    with pytest.raises(LabelSyntaxError, match=None) as e:
        LabelRef.parse(text)
    assert why in str(e.value)


def test_versions_parse_and_order() -> None:
    assert PolicyVersion.parse("1.10") > PolicyVersion.parse("1.9")
    assert str(PolicyVersion.parse("2.0")) == "2.0"
    for bad in ("1", "1.0.0", "a.b", "", "1.123456789"):
        with pytest.raises(ValueError):
            PolicyVersion.parse(bad)


def small(**kw: object) -> Policy:
    args: dict[str, object] = dict(
        name="t.model",
        version=PolicyVersion(1, 0),
        bootstrap="dom0",
        ste_types=["s"],
        cw_types=["a", "b"],
        conflict_sets=[ConflictSet("ab", ["a", "b"])],
        vm_labels=[VmLabel("dom0", ["s"], ["a"])],
        resource_labels=[ResourceLabel("disk", "s")],
    )
    args.update(kw)
    return Policy(**args)  # type: ignore[arg-type]


def test_invalid_policy_lists_every_problem_with_its_path() -> None:
    with pytest.raises(PolicyError) as e:
        small(
            bootstrap="nobody",
            vm_labels=[VmLabel("dom0", ["s", "t"], ["a", "b"])],
            conflict_sets=[ConflictSet("ab", ["a", "b"]), ConflictSet("solo", ["a"])],
        )
    got = {(p.path, p.message) for p in e.value.problems}
    assert got == {
        (
            ("conflict_sets", 1, "types"),
            "conflict set 'solo' needs at least two types to mean anything",
        ),
        (("vm_labels", 0, "ste_types", "t"), "VM label 'dom0' names unknown STE type 't'"),
        (
            ("vm_labels", 0, "cw_types", "b"),
            "VM label 'dom0' has Chinese Wall types 'a', 'b' that conflict with each other in "
            "conflict set 'ab'",
        ),
        (("bootstrap",), "bootstrap label 'nobody' is not a VM label of the policy"),
    }


def test_no_invalid_policy_object_can_exist() -> None:
    p = small()
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        p.bootstrap = "other"  # type: ignore[misc]
    with pytest.raises(PolicyError):
        attrs.evolve(p, bootstrap="other")  # evolve goes through the validating constructor
    assert p.bootstrap == "dom0"


def test_vm_and_resource_labels_are_separate_namespaces() -> None:
    p = small(resource_labels=[ResourceLabel("dom0", "s")])  # as ACM's DEFAULT policy does
    assert p.vm_label("dom0") is not None and p.resource_label("dom0") is not None
    assert p.label_string("dom0") == "ACM:t.model:dom0"


def test_renames_must_be_unambiguous() -> None:
    with pytest.raises(PolicyError) as e:
        small(
            vm_labels=[
                VmLabel("dom0", ["s"], from_name="old"),
                VmLabel("x", ["s"], from_name="old"),
            ]
        )
    assert e.value.messages == ["VM labels 'dom0' and 'x' both rename 'old'"]
