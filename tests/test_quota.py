"""Quota checks (shyped.core.quota): each quota kind permits at its limit and denies one beyond it
with a reason naming the label, the quota and the numbers; the usage table over a host model
built by the real parser from the reference capture."""

from __future__ import annotations

from pathlib import Path

import attrs
import pytest
from hostmodel_helpers import load_layout
from hypothesis import given
from hypothesis import strategies as st

from shyped.core.accounting import DomainAccount, account_domain, account_host
from shyped.core.assembler import EventAssembler
from shyped.core.host import HostModel
from shyped.core.hostfacts import DomainState, NeedsDecision
from shyped.core.quota import (
    ADMISSION_KINDS,
    MIB,
    QuotaKind,
    QuotaUsage,
    check,
    format_quota_table,
    quota_table,
    quota_table_dict,
    running_with_label,
)
from shyped.policy.decisions import Hook, Rule
from shyped.policy.model import Policy, PolicyVersion, Quota, VmLabel
from shyped.policy.toml_format import load as load_policy

CONNECTED = load_layout("layout-connected.txt", "vchan.txt")
HOSTING = Path(__file__).parent.parent / "conf" / "policies" / "hosting.toml"


def policy(**limits: int) -> Policy:
    return Policy(
        "q",
        PolicyVersion(1, 0),
        "dom0",
        ste_types=("s",),
        vm_labels=(
            VmLabel("dom0", {"s"}),
            VmLabel("web", {"s"}, quota=Quota(**limits)),
            VmLabel("free", {"s"}),
        ),
    )


def account(**over: object) -> DomainAccount:
    base: dict[str, object] = {
        "domid": 3,
        "uuid": "6f1b1c9e-2a4d-4c55-9e0e-5ca1ab1e0003",
        "name": "web1",
        "label": "web",
        "state": DomainState.ADMITTED,
        "memory_target_bytes": 128 * MIB,
        "memory_max_bytes": 256 * MIB,
        "vcpus": 2,
        "vcpus_online": 1,
        "devices": (("vbd", 2), ("vif", 1)),
        "backend_devices": (),
        "event_channels": (("vbd", 2), ("vif", 2)),
        "grant_refs": (("vbd", 2), ("vchan", 1), ("vif", 2)),
        "vchans_served": 1,
        "vchans_joined": 1,
        "garbage_writes": 0,
        "garbage_limit_hits": 0,
        "decisions": (),
    }
    base.update(over)
    return DomainAccount(**base)  # type: ignore[arg-type]


#: (quota, what the default account uses of it, the unit in reasons)
USES = [
    (QuotaKind.MEMORY, 256, "MiB"),
    (QuotaKind.VCPUS, 2, "vCPUs"),
    (QuotaKind.DEVICES, 3, "devices"),
    (QuotaKind.VCHANS, 2, "vchans"),
    (QuotaKind.EVENT_CHANNELS, 4, "event channels"),
    (QuotaKind.GRANT_REFS, 5, "grant refs"),
]


@pytest.mark.parametrize(("kind", "used", "unit"), USES)
def test_each_per_domain_quota_permits_at_the_limit_and_denies_beyond(
    kind: QuotaKind, used: int, unit: str
) -> None:
    at = check(policy(**{kind.value: used}), "web", account(), hook=Hook.DOMAIN_ADMIT)
    assert at.permitted and at.rule is Rule.QUOTA
    assert f"{kind.metric} {used}/{used}" in at.reason
    beyond = check(policy(**{kind.value: used - 1}), "web", account(), hook=Hook.DOMAIN_ADMIT)
    assert not beyond.permitted
    assert beyond.rule is Rule.QUOTA and beyond.hook is Hook.DOMAIN_ADMIT
    assert beyond.subject_label == "web"
    assert beyond.reason == (
        f"label 'web' quota {kind.value}: domain 'web1' (3) "
        f"{'may use' if kind in (QuotaKind.MEMORY, QuotaKind.VCPUS) else 'has'} "
        f"{used} {unit}, limit {used - 1} {unit}"
    )
    assert str(beyond).startswith("deny domain-admit [quota]: label 'web' quota ")


def test_max_domains_counts_the_domain_being_admitted() -> None:
    pol = policy(max_domains=2)
    assert check(pol, "web", account(), hook=Hook.DOMAIN_ADMIT, others_running=1).permitted
    d = check(pol, "web", account(), hook=Hook.DOMAIN_ADMIT, others_running=2)
    assert not d.permitted
    assert d.reason == (
        "label 'web' quota max_domains: 3 domains would run with it "
        "(domain 'web1' (3) and 2 more), limit 2"
    )
    # without the running count the domain quota is not judged
    assert check(pol, "web", account(), hook=Hook.DOMAIN_ADMIT).permitted


def test_zero_means_none_allowed_and_every_exceeded_quota_is_named() -> None:
    d = check(
        policy(max_vchans=0, max_vcpus=1, max_memory_mib=512),
        "web",
        account(),
        hook=Hook.DOMAIN_ADMIT,
    )
    assert not d.permitted
    assert "quota max_vcpus: domain 'web1' (3) may use 2 vCPUs, limit 1 vCPUs" in d.reason
    assert "quota max_vchans: domain 'web1' (3) has 2 vchans, limit 0 vchans" in d.reason
    assert "max_memory_mib" not in d.reason


def test_memory_is_static_max_else_target_rounded_up_to_mib() -> None:
    pol = policy(max_memory_mib=200)
    only_target = account(memory_max_bytes=None, memory_target_bytes=200 * MIB)
    assert check(pol, "web", only_target, hook=Hook.DOMAIN_ADMIT).permitted
    one_byte_more = account(memory_max_bytes=200 * MIB + 1)
    d = check(pol, "web", one_byte_more, hook=Hook.DOMAIN_ADMIT)
    assert not d.permitted and "may use 201 MiB, limit 200 MiB" in d.reason


def test_unknown_sizes_are_not_judged_until_known() -> None:
    unknown = account(memory_max_bytes=None, memory_target_bytes=None, vcpus=None)
    d = check(policy(max_memory_mib=1, max_vcpus=1), "web", unknown, hook=Hook.DOMAIN_ADMIT)
    assert d.permitted
    assert "memory_bytes unknown/1" in d.reason and "vcpus unknown/1" in d.reason


def test_the_hook_selects_the_quotas_a_check_looks_at() -> None:
    pol = policy(max_memory_mib=1, max_devices=1, max_vchans=1)
    dev = check(pol, "web", account(), hook=Hook.DEVICE_CHANNEL)
    assert not dev.permitted and dev.hook is Hook.DEVICE_CHANNEL
    assert "max_devices" in dev.reason and "max_memory_mib" not in dev.reason
    vchan = check(pol, "web", account(), hook=Hook.VCHAN)
    assert "max_vchans" in vchan.reason and "max_devices" not in vchan.reason
    only_mem = check(pol, "web", account(), hook=Hook.VCHAN, kinds=[QuotaKind.MEMORY])
    assert "max_memory_mib" in only_mem.reason and "max_vchans" not in only_mem.reason


def test_labels_without_quota_unknown_or_missing_are_permitted_by_this_rule() -> None:
    pol = policy(max_devices=0)
    for label, why in (
        ("free", "label 'free' has no quota"),
        ("ghost", "no quota: 'ghost' is not a VM label"),
        (None, "unlabelled: no quota applies"),
    ):
        d = check(pol, label, account(label=label), hook=Hook.DOMAIN_ADMIT)
        assert d.permitted and d.reason == why


@given(limit=st.integers(0, 64), used=st.integers(0, 64))
def test_a_deny_exactly_when_use_exceeds_the_limit(limit: int, used: int) -> None:
    acc = account(devices=(("vbd", used),) if used else ())
    d = check(policy(max_devices=limit), "web", acc, hook=Hook.DEVICE_CHANNEL)
    assert d.permitted == (used <= limit)
    if not d.permitted:
        assert f"has {used} devices, limit {limit} devices" in d.reason


# ---- on a host model from the reference capture ---------------------------------------------


def reference_model(label: str) -> HostModel:
    model = HostModel(dom0_label="dom0")
    queue = [o for o in model.apply_all(EventAssembler().reconcile(CONNECTED))]
    while queue:
        need = queue.pop(0)
        if isinstance(need, NeedsDecision):
            queue.extend(model.record_decision(need, True, label=label, reason="test"))
    return model


def test_usage_table_over_the_reference_domain() -> None:
    pol = load_policy(HOSTING)
    model = reference_model("bank-a-web")
    rows = quota_table(pol, account_host(model))
    table = {(r.label, r.kind): r for r in rows}
    # bank-a-web: max_domains 4, max_memory_mib 8192, max_vcpus 4 (conf/policies/hosting.toml)
    assert table["bank-a-web", QuotaKind.DOMAINS] == QuotaUsage(
        "bank-a-web", QuotaKind.DOMAINS, 4, 1
    )
    assert table["bank-a-web", QuotaKind.MEMORY] == QuotaUsage(
        "bank-a-web", QuotaKind.MEMORY, 8192, 128, 1
    )
    assert table["bank-a-web", QuotaKind.VCPUS] == QuotaUsage(
        "bank-a-web", QuotaKind.VCPUS, 4, 1, 1
    )
    # vif (2 ports, 2 refs) + vbd (1, 1) + console (1, 1): the reference guest's frontends
    assert table["bank-a-web", QuotaKind.EVENT_CHANNELS].used == 4
    assert table["bank-a-web", QuotaKind.GRANT_REFS].used == 4
    assert table["bank-a-web", QuotaKind.DEVICES].used == 3
    assert table["bank-a-web", QuotaKind.VCHANS].used == 1  # client of dom0's vchan
    assert table["bank-b-web", QuotaKind.DOMAINS].used == 0
    assert {r.label for r in rows} == {"bank-a-web", "bank-b-web"}  # the labels with a quota
    assert len(rows) == 2 * len(ADMISSION_KINDS)  # run-time rows only with metering
    assert table["bank-b-web", QuotaKind.MEMORY].limit is None  # shown, unlimited
    assert not any(r.exceeded for r in rows)
    data = quota_table_dict(rows)
    assert data["bank-a-web"]["max_memory_mib"] == {
        "limit": 8192,
        "used": 128,
        "domid": 1,
        "exceeded": False,
    }
    text = format_quota_table(rows)
    assert text.splitlines()[0].split() == ["LABEL", "QUOTA", "USED", "LIMIT", "DOMID"]
    assert any(
        line.split() == ["bank-a-web", "max_memory_mib", "128", "8192", "1"]
        for line in text.splitlines()
    )


def test_usage_table_marks_an_exceeded_quota_and_counts_only_running_domains() -> None:
    pol = policy(max_vcpus=0, max_domains=0)
    model = reference_model("web")
    rows = {r.kind: r for r in quota_table(pol, account_host(model))}
    assert rows[QuotaKind.VCPUS].exceeded and rows[QuotaKind.DOMAINS].exceeded
    assert "!" in format_quota_table(rows.values())
    denied = HostModel(dom0_label="dom0")
    for o in denied.apply_all(EventAssembler().reconcile(CONNECTED)):
        if isinstance(o, NeedsDecision) and o.kind == "domain":
            denied.record_decision(o, False, label="web", reason="test")
    rows = {r.kind: r for r in quota_table(pol, account_host(denied))}
    assert rows[QuotaKind.DOMAINS].used == 0 and rows[QuotaKind.VCPUS].domid is None
    assert running_with_label(model, "web") == 1
    assert running_with_label(model, "web", exclude=1) == 0
    assert format_quota_table([]) == "no quotas\n"


def test_admission_check_from_the_model_as_the_engine_would_call_it() -> None:
    model = reference_model("web")
    acc = account_domain(model, 1)
    assert acc is not None
    pol = policy(max_domains=1, max_memory_mib=64)
    d = check(
        pol,
        "web",
        acc,
        hook=Hook.DOMAIN_ADMIT,
        others_running=running_with_label(model, "web", exclude=1),
    )
    assert not d.permitted
    assert d.reason == (
        "label 'web' quota max_memory_mib: domain 'xsgold' (1) may use 128 MiB, limit 64 MiB"
    )
    assert attrs.evolve(acc, memory_max_bytes=64 * MIB).memory_bytes == 64 * MIB
