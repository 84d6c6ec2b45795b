"""Run-time quotas on the hypervisor's metering: the pure evaluator (a breach once per excursion,
CPU judged over a full window, the top consumer named) and, through the real daemon on the
sandbox, the same decision path as every other quota — a deny with rule quota, logged, audited,
counted, and in enforcing mode a pause of the label's top consumer. The sandbox has no
hypervisor, so the samples libxenstat would read are handed to the metrics state directly."""

from __future__ import annotations

import json
from pathlib import Path

import attrs
import pytest
import pytest_twisted
from audit_helpers import file_records
from daemon_helpers import Harness, domcfg, host_fixture
from hostmodel_helpers import from_snapshot, load_layout
from metrics_helpers import MIB, parse_scrape, value
from wiring_helpers import labels_with, quota_policy, scrape, start, with_audit, with_metrics

from shyped.control.backend import QuotaRow
from shyped.control.daemon_backend import DaemonControlBackend
from shyped.core.accounting import account_host
from shyped.core.actions import VetoDomain
from shyped.core.metering import DomainMeter, MeterSample
from shyped.core.modes import DomainVeto
from shyped.core.quota import KINDS_BY_HOOK, QuotaKind, RuntimeQuotas, check
from shyped.policy.decisions import Hook, Rule
from shyped.policy.model import Policy, PolicyVersion, Quota, VmLabel

S = 10**9  # ns
__all__ = ["host_fixture"]  # the sandbox host fixture, `host`


def meter(at: float, *doms: tuple[int, str, int, int]) -> MeterSample:
    """A sample of (domid, name, cpu seconds, memory MiB) per domain."""
    return MeterSample(
        at,
        "xenstat",
        tuple(DomainMeter(d, n, None, cpu * S, memory_bytes=mem * MIB) for d, n, cpu, mem in doms),
    )


def guest_policy(**quota: int) -> Policy:
    return Policy(
        "rt",
        PolicyVersion(1, 0),
        "dom0",
        ste_types=("s",),
        vm_labels=(VmLabel("dom0", {"s"}), VmLabel("guest", {"s"}, quota=Quota(**quota))),
    )


def test_a_breach_is_reported_once_per_excursion_and_names_the_top_consumer() -> None:
    _, model, _ = from_snapshot(load_layout("layout-connected.txt"))  # xsgold (1): "guest"
    host = account_host(model)
    rq = RuntimeQuotas(window=10)
    policy = guest_policy(max_label_memory_mib=100, max_cpu_percent=50)
    assert rq.evaluate(policy, meter(0, (1, "xsgold", 0, 90)), host) == []
    over = rq.evaluate(policy, meter(5, (1, "xsgold", 1, 120)), host)
    assert [(b.kind, b.domid) for b in over] == [(QuotaKind.LABEL_MEMORY, 1)]
    d = over[0].decision
    assert not d.permitted and d.rule is Rule.QUOTA and d.hook is Hook.DOMAIN_ADMIT
    assert "label 'guest' quota max_label_memory_mib: its running domains hold 120 MiB" in (
        d.reason
    )
    assert "limit 100 MiB; the largest user is domain 'xsgold' (1)" in d.reason
    # the CPU is only judged over a full window (10 s): 8 s of CPU in 10 s is 80 % > 50 %
    again = rq.evaluate(policy, meter(10, (1, "xsgold", 8, 120)), host)
    assert [b.kind for b in again] == [QuotaKind.CPU]  # memory: still the same excursion
    assert "used 80% CPU over the last 10 s (hypervisor), limit 50%" in again[0].decision.reason
    assert rq.last_use is not None and rq.last_use["guest"].cpu_share == pytest.approx(0.8)
    # back within both, then over again: reported again
    assert rq.evaluate(policy, meter(20, (1, "xsgold", 9, 50)), host) == []
    assert rq.evaluate(policy, meter(30, (1, "xsgold", 20, 50)), host)[0].kind is QuotaKind.CPU


def test_run_time_quotas_are_not_judged_at_admission() -> None:
    _, model, _ = from_snapshot(load_layout("layout-connected.txt"))
    acc = account_host(model).domain(1)
    assert acc is not None
    policy = guest_policy(max_label_memory_mib=1, max_cpu_percent=1)
    assert not {QuotaKind.LABEL_MEMORY, QuotaKind.CPU} & set(KINDS_BY_HOOK[Hook.DOMAIN_ADMIT])
    assert check(policy, "guest", acc, hook=Hook.DOMAIN_ADMIT, others_running=0).permitted


@pytest_twisted.ensureDeferred
async def test_a_run_time_breach_is_decided_audited_counted_and_pauses_the_top_consumer(
    host: Harness, tmp_path: Path
) -> None:
    config = host.config(
        policy=quota_policy(
            tmp_path, {"shop": {"max_label_memory_mib": 200, "max_cpu_percent": 50}}
        ),
        labels=labels_with(tmp_path, {"shop-2": "shop"}),
    )
    config = with_metrics(with_audit(config, tmp_path / "audit"))
    config = attrs.evolve(config, metrics=attrs.evolve(config.metrics, cpu_window=5.0))
    daemon, metrics = await start(host, config)
    assert metrics is not None
    one = await host.call(host.ts.create, domcfg("shop-1"))
    two = await host.call(host.ts.create, domcfg("shop-2"))
    for d in (one, two):
        await host.call(host.ts.unpause, d)
    await host.settle()
    assert not any(host.domains()[n].paused for n in ("shop-1", "shop-2"))
    assert host.last(f"domain {one}").allowed and host.last(f"domain {two}").allowed
    admitted = len(host.outcomes)

    metrics.state.set_metering(
        "xenstat", meter(0, (one, "shop-1", 0, 100), (two, "shop-2", 0, 100))
    )
    await host.settle()
    assert len(host.outcomes) == admitted  # 200 MiB: at the limit is within it
    metrics.state.set_metering(
        "xenstat", meter(10, (one, "shop-1", 8, 150), (two, "shop-2", 1, 90))
    )
    await host.settle()
    new = host.outcomes[admitted:]
    assert [o.what for o in new] == [f"domain {one}", f"domain {one}"]
    assert {o.decision.rule for o in new} == {Rule.QUOTA} and not any(o.allowed for o in new)
    assert "max_label_memory_mib: its running domains hold 240 MiB" in new[0].decision.reason
    assert "max_cpu_percent: its running domains used 90% CPU" in new[1].decision.reason
    assert all(o.actions == (VetoDomain(one, DomainVeto.PAUSE),) and o.enforced for o in new)
    doms = host.domains()
    assert doms["shop-1"].paused and not doms["shop-2"].paused  # paused, not destroyed

    # the same excursion: no second decision
    metrics.state.set_metering(
        "xenstat", meter(20, (one, "shop-1", 8, 150), (two, "shop-2", 6, 90))
    )
    await host.settle()
    assert len(host.outcomes) == admitted + 2

    daemon.publish_metrics()
    s = parse_scrape(await scrape(metrics))
    assert value(s, "shyped_quota_label_memory_used_bytes", label="shop") == 240 * MIB
    assert value(s, "shyped_quota_label_memory_limit_bytes", label="shop") == 200 * MIB
    assert value(s, "shyped_quota_cpu_limit_ratio", label="shop") == 0.5
    assert value(s, "shyped_quota_cpu_used_ratio", label="shop") == 0.5  # shop-2: 5 s in 10 s
    deny = value(s, "shyped_decisions_total", hook="domain-admit", decision="deny", reason="quota")
    assert deny == 2
    # status carries the run-time rows too (the daemon's and the control socket's)
    rows = daemon.status().quotas["shop"]
    assert rows["max_label_memory_mib"] == {
        "limit": 200,
        "used": 240,
        "domid": one,
        "exceeded": True,
    }
    assert rows["max_cpu_percent"]["limit"] == 50 and rows["max_cpu_percent"]["used"] == 50
    control = DaemonControlBackend(daemon).status().quotas
    assert QuotaRow("shop", "max_label_memory_mib", 240, 200, one, True) in control
    assert [r.quota for r in control if r.label == "shop"][-2:] == [
        "max_label_memory_mib",
        "max_cpu_percent",
    ]
    await daemon.stop()
    reasons = [json.dumps(r) for r in file_records(tmp_path / "audit")]
    assert sum("max_cpu_percent" in r for r in reasons) == 1
    assert sum("max_label_memory_mib" in r for r in reasons) == 1
