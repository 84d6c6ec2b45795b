"""MetricsState, snapshots and the collector: scrapes see whole snapshots only, collection never
holds up the reactor, counters and histograms add up, the CPU time provider is absent without
a hypervisor."""

from __future__ import annotations

import math
import shutil
import stat
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import attrs
import pytest
import pytest_twisted
from hostmodel_helpers import from_snapshot, load_layout
from metrics_helpers import (
    MIB,
    POLICY_SHA256,
    full_meter,
    http_get,
    parse_scrape,
    scenario_policy,
    value,
    values,
)
from prometheus_client import generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from twisted.internet import reactor, task, threads

from shyped.core.events import DomainAppeared, Garbage, RescanHint
from shyped.core.metering import LabelUse
from shyped.policy.decisions import Decision, Hook, Rule
from shyped.service.config import MetricsConfig, Mode
from shyped.service.metrics import (
    LATENCY_BUCKETS,
    MAX_EVENT_KINDS,
    FlaskMetrics,
    MetricsState,
    PeriodicPublisher,
    XlDomain,
    event_kind,
)
from shyped.service.metricsfamilies import (
    METRIC_NAMES,
    MetricsCollector,
    domain_families,
    make_registry,
)
from shyped.service.metricsweb import start_metrics_server
from shyped.service.xlcpu import XlCpuProvider, cpu_by_domid, parse_xl_list

CONNECTED = load_layout("layout-connected.txt", "vchan.txt")
DESTROYED = load_layout("layout-after-destroy.txt")
UUID1 = "6f1b1c9e-2a4d-4c55-9e0e-5ca1ab1e0001"


def deny(hook: Hook = Hook.VCHAN, rule: Rule = Rule.STE) -> Decision:
    return Decision(False, hook, rule, "free text that must not become a label")


def scrape_text(state: MetricsState) -> str:
    return generate_latest(make_registry(lambda: state.snapshot, process=False)).decode()


def test_a_published_snapshot_never_changes_and_the_next_replaces_it() -> None:
    state = MetricsState()
    state.observe_decision(deny())
    first = state.publish(None)
    state.observe_decision(deny())
    assert first.decisions == (("vchan", "deny", "ste", 1),)
    assert state.snapshot is first  # nothing swapped until publish
    second = state.publish(None)
    assert state.snapshot is second and second.decisions == (("vchan", "deny", "ste", 2),)
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        first.decisions = ()  # type: ignore[misc]


def test_decisions_are_labelled_by_rule_not_by_their_free_text() -> None:
    state = MetricsState()
    state.observe_decision(deny())
    state.observe_decision(Decision(True, Hook.DOMAIN_ADMIT, Rule.QUOTA, "label 'x' within"))
    state.publish(None)
    s = parse_scrape(scrape_text(state))
    assert value(s, "shyped_decisions_total", hook="vchan", decision="deny", reason="ste") == 1
    assert value(s, "shyped_decisions_total", reason="quota", decision="permit") == 1
    assert all("free text" not in str(labels) for _, labels, _ in s)


def test_latency_histogram_buckets_sum_and_count() -> None:
    state = MetricsState()
    for latency in (0.00001, 0.0003, 0.0003, 0.02, 60.0, -1.0, math.nan, math.inf):
        state.observe_decision(deny(Hook.DEVICE_CHANNEL), latency)
    state.observe_decision(deny(Hook.DEVICE_CHANNEL))  # no latency: counted, not timed
    state.publish(None)
    s = parse_scrape(scrape_text(state))
    bucket = "shyped_decision_latency_seconds_bucket"
    assert value(s, bucket, hook="device-channel", le="5e-05") == 1
    assert value(s, bucket, hook="device-channel", le="0.0005") == 3
    assert value(s, bucket, hook="device-channel", le="0.025") == 4
    assert value(s, bucket, hook="device-channel", le="10.0") == 4
    assert value(s, bucket, hook="device-channel", le="+Inf") == 5
    assert value(s, "shyped_decision_latency_seconds_count", hook="device-channel") == 5
    total = value(s, "shyped_decision_latency_seconds_sum", hook="device-channel")
    assert total == pytest.approx(0.00001 + 0.0006 + 0.02 + 60.0)
    assert value(s, "shyped_decisions_total", hook="device-channel") == 9
    assert len(values(s, bucket, hook="device-channel")) == len(LATENCY_BUCKETS) + 1


def test_watch_event_kinds_are_bounded() -> None:
    state = MetricsState()
    state.observe_events([DomainAppeared(1, UUID1, "a"), RescanHint("@releaseDomain")])
    state.observe_events([Garbage(1, "/x", "why")] * 3)
    assert event_kind(RescanHint("x")) == "rescan_hint"
    for i in range(MAX_EVENT_KINDS + 10):
        state.observe_watch_events(f"kind{i}", 2)
    state.publish(None)
    s = parse_scrape(scrape_text(state))
    assert value(s, "shyped_watch_events_total", kind="garbage") == 3
    assert value(s, "shyped_watch_events_total", kind="domain_appeared") == 1
    assert len(values(s, "shyped_watch_events_total")) == MAX_EVENT_KINDS + 1
    assert value(s, "shyped_watch_events_total", kind="other") == 2 * 13


def test_mode_is_one_of_the_configured_modes() -> None:
    state = MetricsState()
    state.set_mode(Mode.PERMISSIVE)
    state.publish(None)
    s = parse_scrape(scrape_text(state))
    assert value(s, "shyped_enforcement_mode", mode="permissive") == 1
    assert value(s, "shyped_enforcement_mode", mode="enforcing") == 0
    with pytest.raises(ValueError):
        state.set_mode("lenient")


def test_every_family_the_collector_can_expose_is_listed() -> None:
    _, model, _ = from_snapshot(CONNECTED)
    state = MetricsState()
    state.observe_decision(deny(), 0.001)
    state.set_mode("enforcing")
    state.set_xenstore(False, 3)
    state.observe_watch_events("domain_appeared")
    state.set_policy(scenario_policy(), POLICY_SHA256, 1.0)
    state.set_metering("xenstat", full_meter(1, "xsgold"))
    state.set_label_use({"web": LabelUse("web", 3 * MIB, 0.25, 1, 1)})  # run-time quotas
    state.set_flask(FlaskMetrics("enforcing", "ab" * 32, (("event", 2),), 1))
    state.publish(model)
    s = parse_scrape(scrape_text(state))
    assert value(s, "shyped_quota_cpu_used_ratio", label="web") == 0.25
    assert value(s, "shyped_quota_cpu_limit_ratio", label="web") == 2.0
    assert value(s, "shyped_quota_label_memory_used_bytes", label="web") == 3 * MIB
    families = {
        n.removesuffix("_bucket").removesuffix("_count").removesuffix("_sum") for n, *_ in s
    }
    assert families == set(METRIC_NAMES)
    assert value(s, "shyped_xenstore_up") == 0
    assert value(s, "shyped_xenstore_reconnects_total") == 3
    assert value(s, "shyped_flask_mode", mode="enforcing") == 1
    assert value(s, "shyped_flask_mode", mode="absent") == 0
    assert value(s, "shyped_flask_avc_denials_total", tclass="event") == 2


# ---- consistency under concurrent scrapes -----------------------------------------------------


def test_scrapes_in_threads_only_ever_see_whole_snapshots() -> None:
    """The reactor thread (here: the test thread) alternates between two hosts; every scrape
    made meanwhile on other threads must show exactly one of them, never a mix."""
    _, two_domains, _ = from_snapshot(CONNECTED)
    _, one_domain, _ = from_snapshot(DESTROYED)
    ticks = iter(range(1, 10**9))
    state = MetricsState(clock=lambda: float(next(ticks)))
    registry = make_registry(lambda: state.snapshot, process=False)
    stop = threading.Event()
    seen: list[tuple[float, set[str], set[str], float]] = []
    errors: list[BaseException] = []

    def scraper() -> None:
        try:
            while not stop.is_set():
                s = parse_scrape(generate_latest(registry).decode())
                at = value(s, "shyped_metrics_published_timestamp_seconds")
                info = {lab["domid"] for n, lab, _ in s if n == "shyped_domain_info"}
                vch = {lab["domid"] for n, lab, _ in s if n == "shyped_domain_garbage_writes_total"}
                seen.append((at, info, vch, sum(values(s, "shyped_domains"))))
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    state.publish(two_domains)  # tick 1: odd ticks are the two-domain host
    threads_ = [threading.Thread(target=scraper) for _ in range(2)]
    for t in threads_:
        t.start()
    deadline = time.monotonic() + 60
    try:
        i = 0
        while len(seen) < 60 and time.monotonic() < deadline and not errors:
            state.publish(one_domain if i % 2 == 0 else two_domains)
            i += 1
    finally:
        stop.set()
        for t in threads_:
            t.join(30)
    assert not errors, errors
    assert len(seen) >= 60
    assert {int(at) % 2 for at, *_ in seen} == {0, 1}  # both hosts were scraped
    for at, info, vch, total in seen:
        expected = {"0", "1"} if int(at) % 2 == 1 else {"0"}
        assert info == vch == expected, (at, info, vch)
        assert total == len(expected)


class _Blocking(Collector):
    """A collector that holds the scrape until released."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()

    def collect(self) -> Iterable[Metric]:
        self.entered.set()
        self.release.wait(30)
        return [GaugeMetricFamily("test_blocking", "held scrape", value=1)]


@pytest_twisted.ensureDeferred
async def test_a_slow_scrape_does_not_hold_up_the_reactor() -> None:
    state = MetricsState()
    registry = make_registry(lambda: state.snapshot, process=False)
    blocking = _Blocking()
    registry.register(blocking)
    port = start_metrics_server(
        reactor, MetricsConfig(True, "127.0.0.1", 0, allow_unauthenticated=True), registry
    )
    url = f"http://127.0.0.1:{port.getHost().port}/metrics"
    try:
        scrape = threads.deferToThread(http_get, url)
        while not blocking.entered.is_set():
            await task.deferLater(reactor, 0.01, lambda: None)
        # the scrape is inside collect(); the reactor still runs timers and publishes
        ticks = 0
        for _ in range(5):
            await task.deferLater(reactor, 0.01, lambda: None)
            state.publish(None)
            ticks += 1
        assert ticks == 5 and not scrape.called
        blocking.release.set()
        body = await scrape
        assert b"test_blocking 1.0" in body
    finally:
        blocking.release.set()
        await port.stopListening()


# ---- publishing on the reactor's clock ------------------------------------------------------


def test_periodic_publisher_publishes_only_what_changed() -> None:
    clock = task.Clock()
    _, model, _ = from_snapshot(CONNECTED)
    state = MetricsState(clock=clock.seconds)
    pub = PeriodicPublisher(clock, state, lambda: model, interval=1.0)
    pub.start()
    first = state.snapshot
    assert first.host is not None and first.published_at == 0.0
    clock.advance(1.0)
    assert state.snapshot is first  # nothing observed: no walk over the domains
    pub.mark()
    clock.advance(1.0)
    assert state.snapshot is not first and state.snapshot.published_at == 2.0
    pub.stop()


# ---- CPU time from xl ---------------------------------------------------------------------

#: `xl list -v` as tools/xl/xl_info.c list_domains prints it (format "%-40s %5d %5lu %5d
#: %c%c%c%c%c%c  %8.1f", then " <uuid> %8s" and the security label column with -v).
XL_LIST_V = (
    "Name                                        ID   Mem VCPUs\tState\tTime(s)"
    "   UUID                            Reason-Code\tSecurity Label\n"
    "Domain-0                                     0  1024     2     r-----     123.4"
    " 00000000-0000-0000-0000-000000000000        -                -\n"
    "xsgold                                       1   128     1     -b----       7.5"
    f" {UUID1}        -                -\n"
    "stale                                        2   128     1     --p---       1.0"
    " 6f1b1c9e-2a4d-4c55-9e0e-5ca1ab1effff        -                -\n"
)


def test_xl_list_is_parsed_and_matched_to_the_models_domains_by_uuid() -> None:
    rows = parse_xl_list(XL_LIST_V)
    assert rows == [
        XlDomain("Domain-0", 0, "00000000-0000-0000-0000-000000000000", 123.4),
        XlDomain("xsgold", 1, UUID1, 7.5),
        XlDomain("stale", 2, "6f1b1c9e-2a4d-4c55-9e0e-5ca1ab1effff", 1.0),
    ]
    _, model, _ = from_snapshot(CONNECTED)
    state = MetricsState()
    state.set_cpu_times(rows)
    snap = state.publish(model)
    assert cpu_by_domid(snap) == {0: 123.4, 1: 7.5}  # domid 2 is not in the model
    s = parse_scrape(scrape_text(state))
    assert value(s, "shyped_xen_domain_cpu_seconds_total", domid="1") == 7.5
    # another incarnation under the same domid is not charged to ours
    state.set_cpu_times([XlDomain("xsgold", 1, "6f1b1c9e-2a4d-4c55-9e0e-5ca1ab1e9999", 1.0)])
    assert cpu_by_domid(state.publish(model)) == {}


@pytest_twisted.ensureDeferred
async def test_without_a_hypervisor_xl_fails_and_there_is_no_cpu_series() -> None:
    if shutil.which("xl") is None:
        pytest.skip("xl (Debian xen-utils) is not installed")
    _, model, _ = from_snapshot(CONNECTED)
    state = MetricsState()
    state.set_cpu_times([XlDomain("xsgold", 1, UUID1, 1.0)])  # from an earlier poll
    provider = XlCpuProvider(reactor, state, ("xl",), timeout=20)
    await provider.poll()  # the real xl: "Can't find hypervisor information in sysfs!"
    assert provider.failures == 1
    state.publish(model)
    assert values(parse_scrape(scrape_text(state)), "shyped_xen_domain_cpu_seconds_total") == []
    missing = XlCpuProvider(reactor, state, ("/nonexistent/xl",))
    assert not missing.available() and missing.start() is False


@pytest_twisted.ensureDeferred
async def test_the_provider_reads_xl_output_from_a_child_process(tmp_path: Path) -> None:
    """The process plumbing, with a script standing in for xl on a real dom0."""
    xl = tmp_path / "xl"
    xl.write_text(f"#!/bin/sh\n[ \"$1 $2\" = 'list -v' ] || exit 2\ncat <<'EOF'\n{XL_LIST_V}EOF\n")
    xl.chmod(xl.stat().st_mode | stat.S_IXUSR)
    _, model, _ = from_snapshot(CONNECTED)
    state = MetricsState()
    provider = XlCpuProvider(reactor, state, (str(xl),))
    await provider.poll()
    assert cpu_by_domid(state.publish(model)) == {0: 123.4, 1: 7.5}
    hung = tmp_path / "hung"
    hung.write_text("#!/bin/sh\nexec sleep 60\n")
    hung.chmod(0o755)
    slow = XlCpuProvider(reactor, state, (str(hung),), timeout=0.2)
    await slow.poll()  # killed after the timeout: no series rather than a stuck poll
    snap = state.publish(model)
    assert slow.failures == 1 and snap.metering is None
    assert snap.metering_source == "xl" and not snap.metering_up


def test_a_changed_domain_is_rescraped_and_the_others_samples_are_reused() -> None:
    asm, model, _ = from_snapshot(CONNECTED)
    state = MetricsState()
    collector = MetricsCollector(lambda: state.snapshot)
    state.publish(model)

    def samples() -> dict[tuple[str, str], Any]:
        return {
            (s.name, s.labels.get("domid", "")): s
            for fam in collector.collect()
            for s in fam.samples
            if s.name in ("shyped_domain_memory_target_bytes", "shyped_domain_garbage_writes_total")
        }

    before = samples()
    model.apply_all(asm.feed("/local/domain/1/memory/target", b"65536"))
    state.publish(model)
    after = samples()
    assert after["shyped_domain_memory_target_bytes", "1"].value == 65536 * 1024
    assert before["shyped_domain_memory_target_bytes", "1"].value == 131072 * 1024
    # dom0 did not change: its rows are reused, not rebuilt
    snap = state.snapshot
    assert snap.host is not None
    _, rows = domain_families(snap, None)
    _, again = domain_families(state.publish(model), rows)
    assert again[0][1] is rows[0][1] and again[1][1] is rows[1][1]
    model.apply_all(asm.feed("/local/domain/1/memory/target", b"32768"))
    _, changed = domain_families(state.publish(model), again)
    assert changed[0][1] is again[0][1] and changed[1][1] is not again[1][1]
