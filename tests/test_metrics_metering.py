"""Hypervisor metering: the real libxenstat on the sandbox (no hypervisor: no series, the up
flag at 0, nothing made up), the sample -> series mapping, matching samples to the model's
domains, CPU shares over a window and per-label use (pure), and the provider's thread plumbing
with a stand-in for the library."""

from __future__ import annotations

from typing import Any

import pytest
import pytest_twisted
from hostmodel_helpers import from_snapshot, load_layout
from metrics_helpers import MIB, full_meter, parse_scrape, value, values
from prometheus_client import generate_latest
from twisted.internet import reactor, task

from shyped.core.accounting import account_host
from shyped.core.metering import (
    CpuWindow,
    DomainMeter,
    MeterSample,
    label_use,
    match,
)
from shyped.service.metrics import MetricsState
from shyped.service.metricsfamilies import make_registry
from shyped.service.xenstat import Xenstat, XenstatProvider, XenstatUnavailable

CONNECTED = load_layout("layout-connected.txt", "vchan.txt")
UUID1 = "6f1b1c9e-2a4d-4c55-9e0e-5ca1ab1e0001"


def scrape(state: MetricsState) -> list[tuple[str, dict[str, str], float]]:
    return parse_scrape(
        generate_latest(make_registry(lambda: state.snapshot, process=False)).decode()
    )


def test_without_a_hypervisor_the_real_libxenstat_gives_no_series() -> None:
    try:
        Xenstat().close()
    except XenstatUnavailable as exc:  # the sandbox: the library is there, Xen is not
        assert "xenstat_init failed" in str(exc) or "libxenstat" in str(exc)
    else:
        pytest.skip("a hypervisor answers: this is a real dom0")
    _, model, _ = from_snapshot(CONNECTED)
    state = MetricsState()
    provider = XenstatProvider(reactor, state.set_metering)
    assert provider.start() is False
    state.publish(model)
    s = scrape(state)
    assert value(s, "shyped_xen_metering_up", source="xenstat") == 0
    assert [
        n for n, _, _ in s if n.startswith("shyped_xen_") and n != "shyped_xen_metering_up"
    ] == []
    with pytest.raises(XenstatUnavailable, match="nonexistent"):
        Xenstat("libxenstat-nonexistent.so")


def test_a_sample_becomes_series_keyed_by_domid() -> None:
    _, model, _ = from_snapshot(CONNECTED)
    state = MetricsState()
    state.set_metering("xenstat", full_meter(1, "xsgold"))
    state.publish(model)
    s = scrape(state)
    one = {"domid": "1"}
    assert value(s, "shyped_xen_metering_up", source="xenstat") == 1
    assert value(s, "shyped_xen_domain_cpu_seconds_total", **one) == 7.25
    assert value(s, "shyped_xen_domain_vcpu_seconds_total", **one, vcpu="0") == 7.0
    assert value(s, "shyped_xen_domain_vcpu_seconds_total", **one, vcpu="1") == 0.25
    assert value(s, "shyped_xen_domain_memory_bytes", **one) == 130 * MIB
    assert value(s, "shyped_xen_domain_memory_max_bytes", **one) == 256 * MIB
    assert value(s, "shyped_xen_vif_receive_bytes_total", **one, vif="0") == 1000
    assert value(s, "shyped_xen_vif_transmit_packets_total", **one, vif="0") == 20
    assert value(s, "shyped_xen_vbd_read_requests_total", **one, vbd="51712") == 5
    assert value(s, "shyped_xen_vbd_read_bytes_total", **one, vbd="51712") == 40 * 512
    assert value(s, "shyped_xen_vbd_write_bytes_total", **one, vbd="51712") == 56 * 512
    for name, labels, _ in s:
        if name.startswith("shyped_xen_domain") or name.startswith("shyped_xen_v"):
            assert not {"domain", "uuid", "label"} & set(labels), name


def test_another_incarnation_or_an_unknown_domain_is_not_charged() -> None:
    _, model, _ = from_snapshot(CONNECTED)
    host = account_host(model)
    sample = MeterSample(
        1.0,
        "xenstat",
        (
            DomainMeter(0, "Domain-0", None, 5),
            DomainMeter(1, "another-xsgold", None, 9),  # domid 1 reused by another domain
            DomainMeter(7, "stranger", None, 9),  # not in the model
        ),
    )
    assert [m.domid for m in match(sample, host)] == [0]
    uuid_mismatch = MeterSample(1.0, "xl", (DomainMeter(1, None, UUID1[:-1] + "9", 1),))
    assert match(uuid_mismatch, host) == ()
    assert len(match(MeterSample(1.0, "xl", (DomainMeter(1, None, UUID1, 1),)), host)) == 1


def test_cpu_share_over_a_window_and_label_use() -> None:
    _, model, _ = from_snapshot(CONNECTED)
    host = account_host(model)
    window = CpuWindow(60)
    assert window.shares() == {}
    window.add(full_meter(1, "xsgold", taken_at=100.0, cpu_ns=10 * 10**9))
    window.add(full_meter(1, "xsgold", taken_at=110.0, cpu_ns=25 * 10**9))  # 15 s in 10 s
    assert window.shares() == {1: 1.5}
    # samples older than the window are dropped (the newest one at or before its start stays)
    window.add(full_meter(1, "xsgold", taken_at=200.0, cpu_ns=35 * 10**9))
    window.add(full_meter(1, "xsgold", taken_at=230.0, cpu_ns=65 * 10**9))
    # kept: from the newest sample at or before 230 - 60 (t=110) on, so at least the window
    assert window.span == 120.0
    assert window.shares() == {1: pytest.approx((65 - 25) / 120)}
    # another incarnation under the same domid: no share until it has two samples of its own
    window.add(full_meter(1, "someone-else", taken_at=240.0, cpu_ns=1))
    assert window.shares() == {}
    use = label_use(full_meter(1, "xsgold").domains, host, {1: 0.5})  # xsgold: label "guest"
    assert use["guest"].memory_bytes == 130 * MIB and use["guest"].cpu_share == 0.5
    assert use["guest"].top_memory == 1 and use["guest"].top_cpu == 1
    assert label_use(full_meter(1, "xsgold").domains, host, None)["guest"].cpu_share is None


class _FakeXenstat:
    """Stands in for the library (no hypervisor here): returns prepared samples."""

    def __init__(self, samples: list[MeterSample | Exception]) -> None:
        self.samples = samples
        self.closed = False

    def read(self) -> MeterSample:
        got = self.samples.pop(0)
        if isinstance(got, Exception):
            raise got
        return got

    def close(self) -> None:
        self.closed = True


@pytest_twisted.ensureDeferred
async def test_the_provider_reads_on_a_pool_thread_and_reports_failures() -> None:
    _, model, _ = from_snapshot(CONNECTED)
    state = MetricsState()
    fake = _FakeXenstat([full_meter(1, "xsgold"), XenstatUnavailable("gone")])
    opened: Any = lambda: fake  # noqa: E731
    provider = XenstatProvider(reactor, state.set_metering, interval=3600, open_xenstat=opened)
    assert provider.start() is True  # the first poll runs now, on the pool
    for _ in range(1000):
        if state.meter_sample is not None:
            break
        await task.deferLater(reactor, 0.01, lambda: None)
    provider.stop()
    assert fake.closed
    snap = state.publish(model)
    assert snap.metering_up and snap.metering is not None
    assert snap.metering[0].cpu_ns == 7_250_000_000
    provider._xs = fake  # type: ignore[assignment]  # reopened: poll once more by hand
    polled = provider.poll()
    assert polled is not None
    await polled
    assert provider.failures == 1 and not state.publish(model).metering_up
    assert values(scrape(state), "shyped_xen_domain_cpu_seconds_total") == []
