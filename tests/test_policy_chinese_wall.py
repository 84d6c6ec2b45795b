"""Chinese Wall admission: ACM's per-type block counts against a brute-force reference."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from policy_helpers import brute_force_admits, policies

from shyped.policy.chinese_wall import NotRunningError, RunningSet, running_set
from shyped.policy.decisions import Hook, PolicyEngine, Rule, UnknownLabelError
from shyped.policy.model import ConflictSet, Defaults, Policy, PolicyVersion, VmLabel


def banks_policy(**kw: object) -> Policy:
    args: dict[str, object] = dict(
        name="t.banks",
        version=PolicyVersion(1, 0),
        bootstrap="dom0",
        ste_types=["sys", "a", "b"],
        cw_types=["sys", "a", "b", "oil-x", "oil-y"],
        conflict_sets=[ConflictSet("banks", ["a", "b"]), ConflictSet("oil", ["oil-x", "oil-y"])],
        vm_labels=[
            VmLabel("dom0", ["sys", "a", "b"], ["sys"]),
            VmLabel("bank-a", ["a"], ["a"]),
            VmLabel("bank-a2", ["a"], ["a", "oil-x"]),
            VmLabel("bank-b", ["b"], ["b"]),
            VmLabel("oil-y", ["b"], ["oil-y"]),
        ],
    )
    args.update(kw)
    return Policy(**args)  # type: ignore[arg-type]


def test_same_label_runs_side_by_side_and_competitor_is_refused() -> None:
    rs = running_set(PolicyEngine(banks_policy()), ["dom0"])
    assert rs.try_start("bank-a").permitted
    assert rs.try_start("bank-a").permitted  # own types never block themselves
    d = rs.admit("bank-b")
    assert not d.permitted
    assert d.hook is Hook.DOMAIN_ADMIT and d.rule is Rule.CHINESE_WALL
    assert d.conflict_set == "banks"
    assert d.cw_types == {"a", "b"}
    assert "'bank-b'" in d.reason and "'a'" in d.reason and "'banks'" in d.reason


def test_counts_only_drop_when_the_last_domain_is_gone() -> None:
    rs = running_set(PolicyEngine(banks_policy()))
    rs.start("bank-a")
    rs.start("bank-a")
    rs.stop("bank-a")
    assert not rs.admit("bank-b").permitted
    rs.stop("bank-a")
    assert rs.admit("bank-b").permitted
    assert rs.blocked_types() == {}
    with pytest.raises(NotRunningError):
        rs.stop("bank-a")


def test_label_in_two_sets_blocks_both() -> None:
    rs = running_set(PolicyEngine(banks_policy()), ["bank-a2"])
    assert not rs.admit("bank-b").permitted
    assert not rs.admit("oil-y").permitted
    assert rs.admit("bank-a").permitted
    assert rs.blocked_types() == {"b": 1, "oil-y": 1}


def test_unlabelled_and_unknown_labels() -> None:
    eng = PolicyEngine(banks_policy())
    rs = running_set(eng)
    d = rs.admit(None)
    assert (d.permitted, d.rule) == (False, Rule.DEFAULT)
    assert rs.admit("ACM:t.banks:nope").rule is Rule.LABEL
    assert "of policy 'other'" in rs.admit("ACM:other:bank-a").reason
    with pytest.raises(UnknownLabelError):
        rs.start(None)
    assert len(rs) == 0

    eng2 = PolicyEngine(banks_policy(defaults=Defaults(unlabelled_domain="bank-b")))
    rs2 = running_set(eng2, ["bank-a"])
    d2 = rs2.admit(None)
    assert not d2.permitted and d2.subject_label == "bank-b"
    assert "unlabelled (default 'bank-b')" in d2.reason


def test_relabel_is_checked_without_the_domain_itself() -> None:
    rs = running_set(PolicyEngine(banks_policy()), ["bank-a"])
    # the only bank-a domain may become bank-b: once it is gone nothing blocks 'b'
    assert rs.admit_relabel("bank-a", "bank-b").permitted
    assert rs.running_labels() == {"bank-a": 1}
    rs.relabel("bank-a", "bank-b")
    assert rs.running_labels() == {"bank-b": 1}
    assert not rs.admit("bank-a").permitted


def test_rebuild_is_all_or_nothing() -> None:
    eng = PolicyEngine(banks_policy())
    rs = running_set(eng, ["bank-a"])
    with pytest.raises(UnknownLabelError) as e:
        rs.rebuild(eng, ["bank-b", "ghost"])
    assert "ghost" in str(e.value)
    assert rs.running_labels() == {"bank-a": 1}


@settings(max_examples=300, deadline=None)
@given(policy=policies(mls=False), data=st.data())
def test_admission_matches_brute_force(policy: Policy, data: st.DataObject) -> None:
    """Random start/stop sequences: incremental counts decide like the direct rule."""
    eng = PolicyEngine(policy)
    rs = RunningSet(eng)
    running: list[VmLabel] = []
    labels = list(policy.vm_labels)
    for _ in range(data.draw(st.integers(1, 40), label="steps")):
        op = data.draw(st.sampled_from(["start", "start", "force", "stop"]), label="op")
        if op == "stop" and running:
            victim = running.pop(data.draw(st.integers(0, len(running) - 1), label="victim"))
            rs.stop(victim.name)
            continue
        lab = data.draw(st.sampled_from(labels), label="label")
        expected = brute_force_admits(policy, running, lab)
        if op == "force":  # reconciling a domain that was already running: counted regardless
            assert rs.admit(lab.name).permitted == expected
            rs.start(lab.name)
            running.append(lab)
            continue
        d = rs.try_start(lab.name)
        assert d.permitted == expected, (lab, running)
        if d.permitted:
            running.append(lab)
        else:
            assert d.conflict_set is not None
            assert d.conflict_set in {
                cs.name for cs in policy.conflict_sets_of(min(d.cw_types & lab.cw_types))
            }
    # a full recount agrees with the incremental counts
    fresh = running_set(eng, [lab.name for lab in running])
    assert fresh.blocked_types() == rs.blocked_types()
    assert len(fresh) == len(rs) == len(running)
    for lab in labels:
        assert rs.admit(lab.name).permitted == brute_force_admits(policy, running, lab)
