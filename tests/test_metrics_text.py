"""The endpoint's exposition text (`shyped.service.metricstext`): byte for byte what
prometheus_client's own encoders make of the same registry, in the text format and in
OpenMetrics; per-domain lines rendered again only for the domains that changed; the HTTP
endpoint negotiates, compresses and filters as prometheus_client's WSGI app does."""

from __future__ import annotations

import gzip
import urllib.request

import pytest
import pytest_twisted
from hostmodel_helpers import from_snapshot, load_layout
from metrics_helpers import (
    POLICY_SHA256,
    full_meter,
    parse_scrape,
    promtool_check,
    scenario_policy,
    value,
)
from prometheus_client import generate_latest
from prometheus_client.openmetrics.exposition import CONTENT_TYPE_LATEST as OPENMETRICS
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics
from twisted.internet import reactor, threads

from shyped.policy.decisions import Decision, Hook, Rule
from shyped.service.config import MetricsConfig
from shyped.service.metrics import MetricsState
from shyped.service.metricsfamilies import make_registry
from shyped.service.metricstext import Exposition
from shyped.service.metricsweb import start_metrics_server

CONNECTED = load_layout("layout-connected.txt", "vchan.txt")
UUID1 = "6f1b1c9e-2a4d-4c55-9e0e-5ca1ab1e0001"
NAME = 'x"s\\gold'  # a name with characters the format escapes
OM_ACCEPT = "application/openmetrics-text; version=1.0.0,text/plain;version=0.0.4;q=0.5"


def full_state() -> tuple[MetricsState, object, object]:
    asm, model, _ = from_snapshot(CONNECTED)
    state = MetricsState()
    state.set_policy(scenario_policy(), POLICY_SHA256, 1_700_000_000.0)
    state.set_mode("enforcing")
    state.set_xenstore(True, 2)
    state.observe_watch_events("domain_appeared")
    state.observe_decision(Decision(False, Hook.VCHAN, Rule.STE, "x"), 0.0004)
    state.observe_decision(Decision(True, Hook.DOMAIN_ADMIT, Rule.QUOTA, "y"), 0.002)
    state.set_metering("xenstat", full_meter(1, NAME))
    # a name with every character the format escapes (dom0 writes names, still: escape them)
    model.apply_all(asm.feed("/local/domain/1/name", NAME.encode()))
    state.publish(model)
    return state, asm, model


@pytest.mark.parametrize("accept", [None, OM_ACCEPT])
def test_the_cached_text_is_byte_for_byte_prometheus_clients(accept: str | None) -> None:
    state, _, _ = full_state()
    registry = make_registry(lambda: state.snapshot, process=False)
    reference = generate_latest if accept is None else generate_openmetrics
    body, content_type = Exposition(registry).render(accept)
    assert body == reference(registry)
    assert content_type.startswith("text/plain" if accept is None else OPENMETRICS.split(";")[0])
    s = parse_scrape(body.decode()) if accept is None else None
    if s is not None:
        assert value(s, "shyped_domain_info", domid="1", domain=NAME) == 1
        assert value(s, "shyped_xen_vbd_write_bytes_total", domid="1", vbd="51712") == 56 * 512
        assert promtool_check(body).returncode == 0


def test_only_changed_domains_are_rendered_again() -> None:
    state, asm, model = full_state()
    registry = make_registry(lambda: state.snapshot, process=False)
    exposition = Exposition(registry)
    first, _ = exposition.render(None)
    assert exposition.text.rendered == 2  # dom0 and xsgold
    state.publish(model)  # a new snapshot, the same accounts
    again, _ = exposition.render(None)
    assert exposition.text.rendered == 2 and again == generate_latest(registry)
    assert again.split(b"\n")[6:] == first.split(b"\n")[6:]  # all but the publication time
    model.apply_all(asm.feed("/local/domain/1/memory/target", b"65536"))  # type: ignore[attr-defined]
    state.publish(model)
    changed, _ = exposition.render(None)
    assert exposition.text.rendered == 3  # only xsgold
    assert changed == generate_latest(registry)
    s = parse_scrape(changed.decode())
    assert value(s, "shyped_domain_memory_target_bytes", domid="1") == 65536 * 1024


def _get(url: str, headers: dict[str, str]) -> tuple[bytes, dict[str, str]]:
    req = urllib.request.Request(url, headers=headers)
    with urllib.request.urlopen(req, timeout=10) as resp:
        return resp.read(), dict(resp.headers)


@pytest_twisted.ensureDeferred
async def test_the_endpoint_negotiates_compresses_and_filters() -> None:
    state, _, _ = full_state()
    port = start_metrics_server(
        reactor,
        MetricsConfig(True, "127.0.0.1", 0, allow_unauthenticated=True),
        make_registry(lambda: state.snapshot),
    )
    url = f"http://127.0.0.1:{port.getHost().port}/metrics"
    try:
        text, h = await threads.deferToThread(_get, url, {})
        assert h["Content-Type"].startswith("text/plain; version=0.0.4")
        assert b"process_cpu_seconds_total" in text  # the other collectors follow
        om, h = await threads.deferToThread(_get, url, {"Accept": OM_ACCEPT})
        assert h["Content-Type"].startswith("application/openmetrics-text")
        assert om.endswith(b"# EOF\n") and om.count(b"# EOF") == 1
        assert b"# TYPE shyped_domain_decisions counter\n" in om
        packed, h = await threads.deferToThread(_get, url, {"Accept-Encoding": "gzip"})
        assert h["Content-Encoding"] == "gzip"
        assert gzip.decompress(packed).startswith(b"# HELP shyped_build_info")
        only, _ = await threads.deferToThread(_get, url + "?name[]=shyped_xenstore_up", {})
        assert only == (
            b"# HELP shyped_xenstore_up 1 while connected to xenstored with every watch "
            b"registered\n# TYPE shyped_xenstore_up gauge\nshyped_xenstore_up 1.0\n"
        )
    finally:
        await port.stopListening()


def test_formats_alternate_over_a_steady_host() -> None:
    """Prometheus negotiates OpenMetrics, a curl gets text: the cached per-domain text of one
    format is never served in the other."""
    state, _, model = full_state()
    registry = make_registry(lambda: state.snapshot, process=False)
    exposition = Exposition(registry)
    for accept in (None, OM_ACCEPT, OM_ACCEPT, None, OM_ACCEPT):
        state.publish(model)  # a new snapshot, the same accounts
        body, _ = exposition.render(accept)
        reference = generate_latest if accept is None else generate_openmetrics
        assert body == reference(registry)
    assert exposition.text.rendered == 2
