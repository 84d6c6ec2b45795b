"""Channel, grant and resource decisions: STE, MLS, defaults, label strings, caches."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from policy_helpers import policies

from shyped.policy import mls
from shyped.policy.decisions import Decision, Hook, PolicyEngine, Rule
from shyped.policy.model import (
    Defaults,
    MlsLabel,
    Policy,
    PolicyVersion,
    ResourceLabel,
    VmLabel,
)

TWO_WAY = [Hook.EVTCHN, Hook.DEVICE_CHANNEL, Hook.VCHAN, Hook.GRANT]


def mls_policy(**kw: object) -> Policy:
    args: dict[str, object] = dict(
        name="t.mls",
        version=PolicyVersion(1, 0),
        bootstrap="dom0",
        ste_types=["sys", "a", "b"],
        mls_levels=["public", "internal", "secret"],
        mls_categories=["pay", "hr"],
        vm_labels=[
            VmLabel("dom0", ["sys", "a", "b"]),
            VmLabel("a-secret", ["a"], mls=MlsLabel("secret", ["pay"])),
            VmLabel("a-secret2", ["a"], mls=MlsLabel("secret", ["pay"])),
            VmLabel("a-internal", ["a"], mls=MlsLabel("internal")),
            VmLabel("a-secret-hr", ["a"], mls=MlsLabel("secret", ["hr"])),
            VmLabel("b", ["b"], mls=MlsLabel("secret", ["pay"])),
        ],
        resource_labels=[
            ResourceLabel("a-disk", "a", MlsLabel("secret", ["pay"])),
            ResourceLabel("a-archive", "a", MlsLabel("internal")),
            ResourceLabel("a-bridge", "a"),
            ResourceLabel("b-disk", "b"),
        ],
    )
    args.update(kw)
    return Policy(**args)  # type: ignore[arg-type]


@pytest.fixture
def eng() -> PolicyEngine:
    return PolicyEngine(mls_policy())


def test_ste_needs_a_common_type(eng: PolicyEngine) -> None:
    d = eng.channel(Hook.VCHAN, "a-secret", "b")
    assert (d.permitted, d.rule, d.hook) == (False, Rule.STE, Hook.VCHAN)
    assert str(d) == "deny vchan [ste]: 'a-secret' and 'b' share no STE type"
    ok = eng.channel(Hook.DEVICE_CHANNEL, "a-secret", "dom0")
    assert ok.permitted and ok.rule is Rule.STE and ok.ste_types == {"a"}
    assert ok.mls == ()  # dom0 carries no MLS part: MLS-exempt


def test_two_way_channels_need_equal_mls(eng: PolicyEngine) -> None:
    assert eng.channel(Hook.EVTCHN, "a-secret", "a-secret2").permitted
    for other in ("a-internal", "a-secret-hr"):
        d = eng.channel(Hook.VCHAN, "a-secret", other)
        assert not d.permitted and d.rule is Rule.MLS
        assert "equal MLS labels" in d.reason
        assert d.mls[0] == MlsLabel("secret", ["pay"])


def test_read_only_grant_needs_mapper_to_dominate(eng: PolicyEngine) -> None:
    # secret{pay} mapper reads an internal page: read down, fine
    assert eng.grant("a-secret", "a-internal", writable=False).permitted
    up = eng.grant("a-internal", "a-secret", writable=False)
    assert not up.permitted and up.rule is Rule.MLS and "dominate" in up.reason
    # a writable map is two-way
    assert not eng.grant("a-secret", "a-internal", writable=True).permitted
    # categories count too: secret{hr} does not dominate secret{pay}
    assert not eng.grant("a-secret-hr", "a-secret", writable=False).permitted


def test_resource_use(eng: PolicyEngine) -> None:
    assert eng.resource("a-secret", "a-disk", writable=True).permitted
    assert eng.resource("a-secret", "a-archive", writable=False).permitted
    rw = eng.resource("a-secret", "a-archive", writable=True)
    assert not rw.permitted and rw.rule is Rule.MLS
    up = eng.resource("a-internal", "a-disk", writable=False)
    assert not up.permitted and up.rule is Rule.MLS
    assert up.reason == (
        "read-only use needs domain 'a-internal' (internal) to dominate "
        "resource 'a-disk' (secret{pay})"
    )
    st_ = eng.resource("a-secret", "b-disk", writable=False)
    assert not st_.permitted and st_.rule is Rule.STE and st_.ste_types == {"b"}
    assert eng.resource("a-secret", "a-bridge", writable=True).rule is Rule.STE


def test_unlabelled_defaults() -> None:
    deny = PolicyEngine(mls_policy())
    d = deny.resource("a-secret", None, writable=False)
    assert (d.permitted, d.rule) == (False, Rule.DEFAULT)
    assert deny.channel(Hook.VCHAN, None, "a-secret").rule is Rule.DEFAULT
    dflt = PolicyEngine(
        mls_policy(
            defaults=Defaults(unlabelled_domain="a-internal", unlabelled_resource="a-archive")
        )
    )
    r = dflt.resource(None, None, writable=False)
    assert r.permitted and (r.subject_label, r.object_label) == ("a-internal", "a-archive")
    assert "unlabelled (default 'a-internal')" in r.reason
    assert not dflt.channel(Hook.VCHAN, None, "a-secret").permitted  # MLS: internal != secret


def test_label_strings_and_unknown_labels(eng: PolicyEngine) -> None:
    assert eng.channel(Hook.VCHAN, "ACM:t.mls:a-secret", "a-secret2").permitted
    other = eng.channel(Hook.VCHAN, "ACM:t.other:a-secret", "a-secret2")
    assert other.rule is Rule.LABEL and "t.other" in other.reason
    bad = eng.channel(Hook.VCHAN, "FLASK:t.mls:a-secret", "a-secret2")
    assert bad.rule is Rule.LABEL and not bad.permitted
    unknown = eng.resource("a-secret", "nope", writable=False)
    assert unknown.rule is Rule.LABEL and "unknown resource label 'nope'" in unknown.reason
    # VM and resource labels are separate namespaces
    assert eng.resource("a-secret", "a-secret", writable=False).rule is Rule.LABEL
    with pytest.raises(ValueError):
        eng.channel(Hook.RESOURCE, "a-secret", "a-secret2")


def test_engine_caches_belong_to_one_policy() -> None:
    old = PolicyEngine(mls_policy())
    d1 = old.channel(Hook.VCHAN, "a-secret", "b")
    assert old.channel(Hook.VCHAN, "a-secret", "b") is d1  # cached, immutable
    relabelled = mls_policy(
        version=PolicyVersion(1, 1),
        vm_labels=[
            VmLabel("dom0", ["sys", "a", "b"]),
            VmLabel("a-secret", ["a", "b"], mls=MlsLabel("secret", ["pay"])),
            VmLabel("b", ["b"], mls=MlsLabel("secret", ["pay"])),
        ],
    )
    new = PolicyEngine(relabelled)
    assert new.channel(Hook.VCHAN, "a-secret", "b").permitted
    assert not old.channel(Hook.VCHAN, "a-secret", "b").permitted


def test_caches_are_bounded() -> None:
    names = [f"l{i}" for i in range(40)]
    p = Policy(
        name="t.many",
        version=PolicyVersion(1, 0),
        bootstrap="l0",
        ste_types=["x"],
        vm_labels=[VmLabel(n, ["x"]) for n in names],
    )
    eng = PolicyEngine(p, cache_size=16)
    for a in names:
        for b in names:
            assert eng.channel(Hook.EVTCHN, a, b).permitted
    assert len(eng._decisions) <= 16
    assert len(eng._ste) <= 16


def _labels(policy: Policy) -> list[str | None]:
    return [lab.name for lab in policy.vm_labels] + [None, "ghost", "ACM:x:y", "bad:"]


@settings(max_examples=200, deadline=None)
@given(policy=policies(), data=st.data())
def test_channel_decisions_are_symmetric(policy: Policy, data: st.DataObject) -> None:
    eng = PolicyEngine(policy)
    a = data.draw(st.sampled_from(_labels(policy)))
    b = data.draw(st.sampled_from(_labels(policy)))
    hook = data.draw(st.sampled_from(TWO_WAY))
    ab, ba = eng.channel(hook, a, b), eng.channel(hook, b, a)
    assert ab.permitted == ba.permitted
    assert ab.rule == ba.rule
    assert ab.ste_types == ba.ste_types
    assert (ab.subject_label, ab.object_label) == (ba.object_label, ba.subject_label)


@settings(max_examples=200, deadline=None)
@given(policy=policies(), data=st.data())
def test_decisions_match_the_rules(policy: Policy, data: st.DataObject) -> None:
    """Every decision agrees with the rule written out directly on the labels."""
    eng = PolicyEngine(policy)
    vms = list(policy.vm_labels)
    a, b = data.draw(st.sampled_from(vms)), data.draw(st.sampled_from(vms))
    writable = data.draw(st.booleans())
    both = a.mls is not None and b.mls is not None

    def mls_two_way() -> bool:
        return not both or (a.mls == b.mls)

    d = eng.channel(Hook.VCHAN, a.name, b.name)
    assert d.permitted == (bool(a.ste_types & b.ste_types) and mls_two_way())

    g = eng.grant(a.name, b.name, writable=writable)
    g_ok = (
        mls_two_way() if writable else (not both or mls.dominates(policy, a.mls, b.mls))  # type: ignore[arg-type]
    )
    assert g.permitted == (bool(a.ste_types & b.ste_types) and g_ok)

    if policy.resource_labels:
        r = data.draw(st.sampled_from(list(policy.resource_labels)))
        rd = eng.resource(a.name, r.name, writable=writable)
        r_both = a.mls is not None and r.mls is not None
        if not r_both:
            r_ok = True
        elif writable:
            r_ok = a.mls == r.mls
        else:
            r_ok = mls.dominates(policy, a.mls, r.mls)  # type: ignore[arg-type]
        assert rd.permitted == (r.ste_type in a.ste_types and r_ok)
        assert isinstance(rd, Decision) and rd.hook is Hook.RESOURCE


level_names = ["low", "mid", "high"]
mls_labels = st.builds(
    MlsLabel, st.sampled_from(level_names), st.frozensets(st.sampled_from(["k0", "k1", "k2"]))
)
_MLS_POLICY = Policy(
    name="t",
    version=PolicyVersion(1, 0),
    bootstrap="d",
    vm_labels=[VmLabel("d")],
    mls_levels=level_names,
    mls_categories=["k0", "k1", "k2"],
)


@given(mls_labels, mls_labels, mls_labels)
def test_dominance_is_a_partial_order(a: MlsLabel, b: MlsLabel, c: MlsLabel) -> None:
    p = _MLS_POLICY
    assert mls.dominates(p, a, a)
    if mls.dominates(p, a, b) and mls.dominates(p, b, a):
        assert a == b
    if mls.dominates(p, a, b) and mls.dominates(p, b, c):
        assert mls.dominates(p, a, c)
