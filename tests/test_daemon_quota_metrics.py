"""Quotas and metrics through the real daemon against real oxenstored: quota vetoes (max_domains
at admission, max_devices at the device hook, memory once libxl wrote the size), the quota table
in ``status()``, and the scraped ``/metrics`` text of a sandbox scenario (checked by promtool)."""

from __future__ import annotations

from pathlib import Path

import pytest_twisted
from daemon_helpers import Harness, domcfg, eventually, host_fixture, image
from metrics_helpers import parse_scrape, promtool_check, value, values
from wiring_helpers import labels_with, quota_policy, scrape, start, with_audit, with_metrics

from shyped.cli.shypectl import _quota_lines
from shyped.control import backend as b
from shyped.control.protocol import structure, unstructure
from shyped.core.xlcfg import parse_vif_spec
from shyped.policy.decisions import Hook, Rule
from shyped.service.config import Config

__all__ = ["host_fixture"]  # the `host` fixture


def shop_config(h: Harness, tmp: Path, quota: dict[str, int]) -> Config:
    return h.config(
        policy=quota_policy(tmp, {"shop": quota}),
        labels=labels_with(tmp, {"shop-2": "shop", "shop-3": "shop"}),
    )


@pytest_twisted.ensureDeferred
async def test_max_domains_destroys_the_second_domain_of_the_label(
    host: Harness, tmp_path: Path
) -> None:
    daemon, _ = await start(host, shop_config(host, tmp_path, {"max_domains": 1}))
    first = await host.call(host.ts.create, domcfg("shop-1"))
    second = await host.call(host.ts.create, domcfg("shop-2"))
    await host.settle()
    assert host.last(f"domain {first}").allowed
    out = host.last(f"domain {second}")
    assert not out.allowed and out.enforced and out.decision.rule is Rule.QUOTA
    assert "label 'shop' quota max_domains: 2 domains would run with it" in out.decision.reason
    assert "shop-2" not in host.domains() and "shop-1" in host.domains()
    table = daemon.status().quotas["shop"]["max_domains"]
    assert table == {"limit": 1, "used": 1, "domid": None, "exceeded": False}
    # What shypectl status gets over the control protocol, and prints.
    rows = b.quota_rows(daemon.quota_table())
    status = b.Status(
        "enforcing", b.PolicyInfo("p", "1", "0" * 64, "toml"), b.Counts(), quotas=rows
    )
    assert structure(unstructure(status), b.Status) == status
    printed = [line.split() for line in _quota_lines(rows)]
    assert printed[0] == ["LABEL", "QUOTA", "USED", "LIMIT", "DOMID"]
    assert ["shop", "max_domains", "1", "1", "-"] in printed
    # The first one gone, the label's slot is free again.
    await host.call(host.ts.destroy, first)
    third = await host.call(host.ts.create, domcfg("shop-3"))
    await host.settle()
    assert host.last(f"domain {third}").allowed and "shop-3" in host.domains()


@pytest_twisted.ensureDeferred
async def test_a_reload_lowering_max_domains_keeps_the_first_comer(
    host: Harness, tmp_path: Path
) -> None:
    daemon, _ = await start(host, shop_config(host, tmp_path, {}))
    first = await host.call(host.ts.create, domcfg("shop-1"))
    second = await host.call(host.ts.create, domcfg("shop-2"))
    await host.settle()
    assert {"shop-1", "shop-2"} <= set(host.domains())
    lowered = tmp_path / "lowered"
    lowered.mkdir()
    result = await daemon.reload_policy(
        quota_policy(lowered, {"shop": {"max_domains": 1}}, version="1.1")
    )
    assert result.applied, str(result)
    await host.settle()
    assert host.last(f"domain {first}").allowed and "shop-1" in host.domains()
    out = host.last(f"domain {second}")
    assert not out.allowed and out.decision.rule is Rule.QUOTA and out.enforced
    assert "shop-2" not in host.domains()


@pytest_twisted.ensureDeferred
async def test_max_devices_cuts_the_device_over_the_quota(host: Harness, tmp_path: Path) -> None:
    await start(host, shop_config(host, tmp_path, {"max_devices": 2}))
    d = await host.call(host.ts.create, domcfg("shop-1", vifs=["bridge=xenbr-public"]))
    await host.settle()
    counted = [o for o in host.outcomes if o.kind == "device" and o.need.domid == d]
    assert counted and all(o.allowed for o in counted)
    devices = len(counted)  # the vif and the console (both libxl device records)
    assert devices == 2
    await host.call(host.ts.attach_nic, d, parse_vif_spec("bridge=xenbr-public"))
    await host.settle()
    out = host.last(f"device vif {d}/1")
    assert not out.allowed and out.enforced and out.decision.rule is Rule.QUOTA
    assert out.decision.hook is Hook.DEVICE_CHANNEL
    assert "quota max_devices: domain 'shop-1'" in out.decision.reason and "has 3 devices" in (
        out.decision.reason
    )
    await eventually(lambda: host.read(f"/libxl/{d}/device/vif/1/backend") is None)
    assert host.read(f"/libxl/{d}/device/vif/0/backend") is not None
    assert "shop-1" in host.domains()


@pytest_twisted.ensureDeferred
async def test_memory_quota_is_checked_once_the_size_is_written(
    host: Harness, tmp_path: Path
) -> None:
    await start(host, shop_config(host, tmp_path, {"max_memory_mib": 64}))
    d = await host.call(host.ts.create, domcfg("shop-1"))  # memory = 128
    await host.settle()
    vetoes = [o for o in host.decided(f"domain {d}") if not o.allowed]
    assert vetoes and vetoes[-1].decision.rule is Rule.QUOTA and vetoes[-1].enforced
    assert "quota max_memory_mib: domain 'shop-1'" in vetoes[-1].decision.reason
    assert "may use 128 MiB, limit 64 MiB" in vetoes[-1].decision.reason
    assert "shop-1" not in host.domains()


@pytest_twisted.ensureDeferred
async def test_scrape_of_a_scenario_shows_decisions_domains_policy_mode_and_passes_promtool(
    host: Harness, tmp_path: Path
) -> None:
    config = with_metrics(with_audit(host.config(), tmp_path / "audit"))
    daemon, metrics = await start(host, config)
    assert metrics is not None
    a = await host.call(
        host.ts.create, domcfg("web-a1", vifs=["bridge=xenbr-bank-a"], disks=[image("web-a1")])
    )
    b = await host.call(host.ts.create, domcfg("web-b1"))
    s = await host.call(host.ts.create, domcfg("shop-1"))
    await host.settle()
    daemon.publish_metrics()
    text = await scrape(metrics)
    samples = parse_scrape(text)

    def decisions(hook: str, decision: str, reason: str) -> float:
        return value(samples, "shyped_decisions_total", hook=hook, decision=decision, reason=reason)

    assert decisions("domain-admit", "deny", "chinese-wall") == 1  # web-b1
    assert decisions("domain-admit", "permit", "chinese-wall") == 2  # web-a1, shop-1
    permitted_devices = sum(1 for o in host.outcomes if o.kind == "device" and o.allowed)
    assert sum(values(samples, "shyped_decisions_total", decision="permit")) == (
        2 + permitted_devices
    )
    web = {"domain": "web-a1", "domid": str(a), "uuid": domcfg("web-a1").uuid or ""}
    assert value(samples, "shyped_domain_info", **web, label="bank-a-web") == 1
    assert value(samples, "shyped_domain_memory_target_bytes", domid=str(a)) == 128 * 1024 * 1024
    assert value(samples, "shyped_domain_devices", domid=str(a), kind="vbd") == 1
    assert value(samples, "shyped_domain_vcpus", domid=str(a)) == 1
    # identity is on shyped_domain_info only; the other per-domain series join on domid
    assert {n for n, lab, _ in samples if "uuid" in lab} == {"shyped_domain_info"}
    # the global and the per-domain decision counters name hooks alike: web-a1's devices
    # (a vbd decided against its image, a vif against its bridge) count as device-channel
    # in both (the global counter also holds those of the vetoed web-b1, whose series are gone)
    per_domain = values(samples, "shyped_domain_decisions_total", hook="device-channel")
    assert (
        2
        <= sum(per_domain)
        <= sum(values(samples, "shyped_decisions_total", hook="device-channel"))
    )
    hooks = {lab["hook"] for n, lab, _ in samples if n == "shyped_decisions_total"}
    assert hooks == {lab["hook"] for n, lab, _ in samples if n == "shyped_domain_decisions_total"}
    assert value(samples, "shyped_domain_info", domain="shop-1", domid=str(s), label="shop") == 1
    assert not values(samples, "shyped_domain_info", domid=str(b))  # destroyed
    assert value(samples, "shyped_policy_info", name="example.hosting", version="1.0") == 1
    assert value(samples, "shyped_enforcement_mode", mode="enforcing") == 1
    assert value(samples, "shyped_xenstore_up") == 1
    assert value(samples, "shyped_decision_latency_seconds_count", hook="domain-admit") == 3
    assert value(samples, "shyped_watch_events_total", kind="domain_appeared") >= 3
    assert value(samples, "shyped_audit_healthy") == 1
    assert value(samples, "shyped_audit_records_total") > 0
    assert value(samples, "shyped_quota_domains_limit", label="bank-a-web") == 4
    assert value(samples, "shyped_quota_domains_used", label="bank-a-web") == 1
    checked = promtool_check(text.encode())
    assert checked.returncode == 0, checked.stdout + checked.stderr

    # A destroyed domain's series are gone.
    await host.call(host.ts.destroy, a)
    await host.settle()
    daemon.publish_metrics()
    samples = parse_scrape(await scrape(metrics))
    assert not [n for n, labels, _ in samples if labels.get("domid") == str(a)]
    assert value(samples, "shyped_quota_domains_used", label="bank-a-web") == 0
