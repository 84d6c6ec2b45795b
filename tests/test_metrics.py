"""The metrics endpoint after a real sandbox scenario: the sandbox toolstack writes what a Xen
4.17 host writes into the real oxenstored, the gateway snapshots it, the real event parser and
host model take it in, a stand-in engine decides (real policy and quota checks), and the
Twisted server answers a scrape over HTTP."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import pytest_twisted
from metrics_helpers import (
    MIB,
    POLICY_SHA256,
    Decider,
    build_scenario,
    http_get,
    parse_scrape,
    promtool_check,
    scenario_policy,
    value,
    values,
)
from twisted.internet import reactor, threads

from shyped.core.assembler import EventAssembler
from shyped.core.host import HostModel
from shyped.sandbox.toolstack import Toolstack
from shyped.sandbox.xenstored import SandboxXenstored
from shyped.service.config import MetricsConfig
from shyped.service.metrics import MetricsState
from shyped.service.metricsfamilies import make_registry
from shyped.service.metricsweb import start_metrics_server
from shyped.xenstore import GatewayConfig, XenstoreGateway


@pytest.fixture
def gateway(xenstored: SandboxXenstored) -> Iterator[XenstoreGateway]:
    gw = XenstoreGateway(GatewayConfig(socket_path=str(xenstored.socket_path)))
    pytest_twisted.blockon(gw.connect())
    yield gw
    pytest_twisted.blockon(gw.close())


async def scrape(port: int) -> bytes:
    url = f"http://127.0.0.1:{port}/metrics"
    data: bytes = await threads.deferToThread(http_get, url)
    return data


@pytest_twisted.ensureDeferred
async def test_scrape_after_a_sandbox_scenario_and_after_a_destroy(
    xenstored: SandboxXenstored, gateway: XenstoreGateway
) -> None:
    ts = Toolstack(xenstored.socket_path)
    doms = build_scenario(ts)

    policy = scenario_policy()
    state = MetricsState()
    state.set_policy(policy, POLICY_SHA256, 1_700_000_000.0)
    state.set_mode("enforcing")
    state.set_xenstore(gateway.connected, gateway.reconnects)
    asm, model = EventAssembler(), HostModel(dom0_label="dom0")
    decider = Decider(policy, state)
    snap = await gateway.snapshot("/")
    decider.run(model, asm.reconcile(snap.nodes))
    state.publish(model)

    port = start_metrics_server(
        reactor,
        MetricsConfig(True, "127.0.0.1", 0, allow_unauthenticated=True),
        make_registry(lambda: state.snapshot),
    )
    try:
        body = await scrape(port.getHost().port)
        checked = promtool_check(body)
        assert checked.returncode == 0, checked.stdout + checked.stderr
        s = parse_scrape(body.decode())

        web1, db1, web2 = doms["web1"], doms["db1"], doms["web2"]
        who = {"domain": "web1", "domid": str(web1), "label": "web"}
        assert value(s, "shyped_domain_info", **who, state="admitted") == 1
        assert value(s, "shyped_domain_info", domain="db1", state="denied", label="db") == 1
        w1, d1, w2 = (str(d) for d in (web1, db1, web2))
        assert value(s, "shyped_domain_memory_max_bytes", domid=w1) == 128 * MIB
        assert value(s, "shyped_domain_memory_target_bytes", domid=w2) == 256 * MIB
        assert value(s, "shyped_domain_vcpus", domid=w1) == 4
        assert value(s, "shyped_domain_vcpus_online", domid=w1) == 2
        for kind in ("vbd", "vif", "console"):
            assert value(s, "shyped_domain_devices", domid=w1, kind=kind) == 1
        # netfront's split event channels and tx/rx rings, blkfront's one of each, console's
        assert value(s, "shyped_domain_guest_event_channels", domid=w1, kind="vif") == 2
        assert value(s, "shyped_domain_guest_grant_refs", domid=w1, kind="vbd") == 1
        assert value(s, "shyped_domain_guest_event_channels", domid=w1, kind="vchan") == 1
        assert value(s, "shyped_domain_vchans", domid=w1, role="server") == 1
        assert value(s, "shyped_domain_vchans", domid=w2, role="client") == 1
        # db1 never ran: only the console port libxl wrote, no frontend published anything
        assert values(s, "shyped_domain_guest_event_channels", domid=d1, kind="vif") == []
        assert value(s, "shyped_domain_guest_event_channels", domid=d1, kind="console") == 1
        assert value(s, "shyped_domain_backend_devices", domid="0", kind="vif") == 3
        # identity only on shyped_domain_info: every other series is keyed by domid
        for name, labels, _ in s:
            if name != "shyped_domain_info":
                assert not {"domain", "uuid"} & set(labels), (name, labels)
                assert "label" not in labels or not name.startswith("shyped_domain_"), name
        # the uuid label is the domain's, as libxl wrote /vm/<uuid>
        assert value(s, "shyped_domain_info", uuid="6f1b1c9e-2a4d-4c55-9e0e-5ca1ab1e0001") == 1

        # decisions: db1 over its memory quota is denied with rule quota, the rest permitted
        assert (
            value(s, "shyped_decisions_total", hook="domain-admit", decision="deny", reason="quota")
            == 1
        )
        assert (
            value(
                s, "shyped_decisions_total", hook="domain-admit", decision="permit", reason="quota"
            )
            == 2
        )
        assert value(s, "shyped_decisions_total", hook="vchan", decision="permit", reason="ste")
        total = sum(values(s, "shyped_decisions_total"))
        assert total == len(decider.decisions)
        assert value(s, "shyped_decision_latency_seconds_count", hook="domain-admit") == 3
        assert (
            value(
                s,
                "shyped_domain_decisions_total",
                domid=d1,
                hook="domain-admit",
                decision="deny",
            )
            == 1
        )
        assert value(s, "shyped_domains", label="web", state="admitted") == 2

        # quotas: web runs 2 of 2, its largest domain has 256 of 256 MiB; db has no runner
        assert value(s, "shyped_quota_domains_used", label="web") == 2
        assert value(s, "shyped_quota_domains_limit", label="web") == 2
        assert value(s, "shyped_quota_memory_used_bytes", label="web") == 256 * MIB
        assert value(s, "shyped_quota_memory_limit_bytes", label="db") == 64 * MIB
        assert value(s, "shyped_quota_domains_used", label="db") == 0
        assert value(s, "shyped_quota_devices_limit", label="web") == 16
        assert values(s, "shyped_quota_devices_limit", label="db") == []  # unlimited

        assert (
            value(s, "shyped_policy_info", name="metrics.test", version="1.2", sha256=POLICY_SHA256)
            == 1
        )
        assert value(s, "shyped_enforcement_mode", mode="enforcing") == 1
        assert value(s, "shyped_enforcement_mode", mode="permissive") == 0
        assert value(s, "shyped_xenstore_up") == 1
        assert value(s, "shyped_watch_events_total", kind="domain_appeared") == 3
        assert value(s, "shyped_watch_events_total", kind="domain_resources") >= 3
        assert values(s, "shyped_xen_domain_cpu_seconds_total") == []  # no hypervisor: absent

        # destroy web2: after the next reconcile and publish its series are gone
        ts.destroy(web2)
        snap = await gateway.snapshot("/")
        decider.run(model, asm.reconcile(snap.nodes))
        state.publish(model)
        s = parse_scrape((await scrape(port.getHost().port)).decode())
        assert [n for n, lab, _ in s if lab.get("domid") == w2] == []
        assert value(s, "shyped_domain_info", domain="web1", state="admitted") == 1
        assert value(s, "shyped_domains", label="web", state="admitted") == 1
        assert value(s, "shyped_quota_domains_used", label="web") == 1
        assert value(s, "shyped_quota_memory_used_bytes", label="web") == 128 * MIB
        # web1's rendezvous nodes are still in xenstore (without a hypervisor oxenstored
        # cannot drop the permission naming the dead client): still served, still counted
        assert value(s, "shyped_domain_vchans", domid=w1, role="server") == 1
        assert value(s, "shyped_domain_info", domain="db1", domid=str(db1)) == 1
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_only_loopback_is_served_and_the_index_points_to_metrics() -> None:
    state = MetricsState()
    registry = make_registry(lambda: state.snapshot)
    for address in ("0.0.0.0", "192.0.2.1", "localhost", "::"):
        with pytest.raises(ValueError, match=r"metrics\.address"):
            start_metrics_server(
                reactor, MetricsConfig(True, address, 0, allow_unauthenticated=True), registry
            )
    port = start_metrics_server(
        reactor, MetricsConfig(True, "127.0.0.1", 0, allow_unauthenticated=True), registry
    )
    try:
        root = await threads.deferToThread(http_get, f"http://127.0.0.1:{port.getHost().port}/")
        assert b"/metrics" in root
        # nothing published yet: the exposition is still valid and says so
        body = await scrape(port.getHost().port)
        assert promtool_check(body).returncode == 0
        s = parse_scrape(body.decode())
        assert value(s, "shyped_metrics_published_timestamp_seconds") == 0
        assert values(s, "shyped_domain_info") == []
    finally:
        await port.stopListening()
