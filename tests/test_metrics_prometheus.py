"""A real Prometheus server (Debian's /usr/bin/prometheus) scrapes the Twisted endpoint every
second on loopback; its HTTP API must then return our series. Bounded waits; the server is
killed afterwards."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Any

import bcrypt
import pytest
import pytest_twisted
from audit_helpers import small
from hostmodel_helpers import from_snapshot, load_layout
from metrics_helpers import (
    METRIC,
    POLICY_SHA256,
    full_meter,
    http_get,
    load_dashboard,
    promql,
    queries,
    scenario_policy,
)
from process_helpers import stop_process
from twisted.internet import reactor, task, threads

from shyped.core.metering import LabelUse
from shyped.policy.decisions import Decision, Hook, Rule
from shyped.service.auditlog import AuditCollector, AuditLog
from shyped.service.config import MetricsConfig
from shyped.service.metrics import MetricsState
from shyped.service.metricsfamilies import make_registry
from shyped.service.metricsweb import start_metrics_server

PROMETHEUS = shutil.which("prometheus")
pytestmark = pytest.mark.skipif(PROMETHEUS is None, reason="prometheus is not installed")
UUID1 = "6f1b1c9e-2a4d-4c55-9e0e-5ca1ab1e0001"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Prometheus:
    """One prometheus process on loopback with its own storage, scraping `target`."""

    def __init__(self, workdir: Path, target: str, jobs: dict[str, str] | None = None) -> None:
        """`jobs`: job name -> extra scrape config lines (default: one job, ``shyped``)."""
        self.port = free_port()
        config = workdir / "prometheus.yml"
        text = "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n"
        for job, extra in (jobs or {"shyped": ""}).items():
            text += (
                f"  - job_name: {job}\n"
                "    scrape_interval: 1s\n"
                "    scrape_timeout: 1s\n"
                f"{extra}"
                "    static_configs:\n"
                f"      - targets: ['{target}']\n"
            )
        config.write_text(text)
        self.log = (workdir / "prometheus.log").open("wb")
        assert PROMETHEUS is not None
        self.proc = subprocess.Popen(
            [
                PROMETHEUS,
                f"--config.file={config}",
                f"--storage.tsdb.path={workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--log.level=warn",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            cwd=workdir,
        )

    def api(self, path: str, **params: str) -> Any:
        url = f"http://127.0.0.1:{self.port}{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        return json.loads(http_get(url, timeout=5))

    def stop(self) -> None:
        stop_process(self.proc)
        self.log.close()


async def wait_for(probe: Callable[[], Any], timeout: float, what: str) -> Any:
    """Poll `probe` in a thread (the reactor keeps serving scrapes) until it returns a truthy
    value; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = await threads.deferToThread(probe)
        except OSError as exc:  # not listening yet
            last = exc
        if last and not isinstance(last, OSError):
            return last
        await task.deferLater(reactor, 0.25, lambda: None)
    raise AssertionError(f"{what}: not within {timeout}s (last: {last!r})")


@pytest_twisted.ensureDeferred
async def test_prometheus_scrapes_the_endpoint_and_answers_queries(tmp_path: Path) -> None:
    _, model, _ = from_snapshot(load_layout("layout-connected.txt", "vchan.txt"))
    state = MetricsState()
    state.set_policy(scenario_policy(), POLICY_SHA256, 1_700_000_000.0)
    state.set_mode("enforcing")
    state.set_xenstore(True, 0)
    state.observe_decision(Decision(False, Hook.VCHAN, Rule.STE, "no common type"), 0.0004)
    state.observe_watch_events("domain_appeared")
    # what libxenstat would read on a real dom0, for the dashboard's metering panels
    state.set_metering("xenstat", full_meter(1, "xsgold"))
    state.set_label_use({"web": LabelUse("web", 130 * 1024 * 1024, 0.5, 1, 1)})
    state.publish(model)
    registry = make_registry(lambda: state.snapshot)
    registry.register(AuditCollector(AuditLog(small(tmp_path / "audit"), durable=False)))
    port = start_metrics_server(
        reactor, MetricsConfig(True, "127.0.0.1", 0, allow_unauthenticated=True), registry
    )
    prom = Prometheus(tmp_path, f"127.0.0.1:{port.getHost().port}")
    try:

        def query(expr: str) -> list[dict[str, Any]]:
            if prom.proc.poll() is not None:
                raise AssertionError(f"prometheus exited with {prom.proc.returncode}")
            answer = prom.api("/api/v1/query", query=expr)
            assert answer["status"] == "success", answer
            result: list[dict[str, Any]] = answer["data"]["result"]
            return result

        await wait_for(lambda: http_get(f"http://127.0.0.1:{prom.port}/-/ready"), 60, "ready")
        up = await wait_for(lambda: query('up{job="shyped"} == 1'), 60, "a successful scrape")
        assert up[0]["metric"]["instance"] == f"127.0.0.1:{port.getHost().port}"

        joined = (
            "shyped_domain_memory_max_bytes * on(domid) group_left(domain, uuid, label) "
            "shyped_domain_info"
        )
        mem = await wait_for(lambda: query(joined), 30, "memory")
        assert len(mem) == 1
        labels = mem[0]["metric"]
        assert {k: labels[k] for k in ("domain", "domid", "uuid", "label")} == {
            "domain": "xsgold",
            "domid": "1",
            "uuid": UUID1,
            "label": "guest",
        }
        assert float(mem[0]["value"][1]) == 128 * 1024 * 1024

        denials = query('sum(shyped_decisions_total{decision="deny"}) by (hook, reason)')
        assert [(r["metric"], r["value"][1]) for r in denials] == [
            ({"hook": "vchan", "reason": "ste"}, "1")
        ]
        info = query("shyped_policy_info")
        assert info[0]["metric"]["sha256"] == POLICY_SHA256
        devices = query("sum by (kind) (shyped_domain_devices)")
        assert {r["metric"]["kind"]: r["value"][1] for r in devices} == {
            "console": "1",
            "vbd": "1",
            "vif": "1",
        }
        # every query of the Grafana dashboard evaluates, and returns series (the joins on
        # domid find their shyped_domain_info), once two scrapes are in
        grafana = {"$__rate_interval": "5s", "$__range": "10s", "$instance": ".*", "$label": ".*"}
        for expr in queries(load_dashboard()):
            if expr.startswith("label_values("):
                expr = METRIC.findall(expr)[0]  # Grafana's function: the series it reads
            sent = promql(expr, grafana)
            answer = await wait_for(lambda e=sent: query(e), 30, f"dashboard query {expr}")
            assert answer, expr
        # Prometheus negotiated OpenMetrics (families named without _total); its metadata
        # holds the types we declared
        meta = prom.api("/api/v1/metadata")["data"]
        assert meta["shyped_decisions"][0]["type"] == "counter"
        assert meta["shyped_decision_latency_seconds"][0]["type"] == "histogram"
        assert meta["shyped_domain"][0]["type"] == "info"
        assert meta["shyped_xen_domain_cpu_seconds"][0]["type"] == "counter"
        assert meta["shyped_domain_memory_max_bytes"][0]["type"] == "gauge"
    finally:
        prom.stop()
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_prometheus_scrapes_with_basic_auth_or_a_bearer_token_and_not_without(
    tmp_path: Path,
) -> None:
    password, token = "a scrape password", "0123456789abcdef0123456789abcdef"
    hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt(4)).decode()
    token_file = tmp_path / "shyped.token"
    token_file.write_text(token + "\n")
    token_file.chmod(0o600)
    # Prometheus' own copies of the credentials (credentials_file / password_file)
    (tmp_path / "prom.password").write_text(password)
    (tmp_path / "prom.token").write_text(token)
    state = MetricsState()
    state.set_mode("enforcing")
    config = MetricsConfig(
        True, "127.0.0.1", 0, basic_auth_users=(("prometheus", hashed),),
        bearer_token_file=token_file,
    )  # fmt: skip
    port = start_metrics_server(reactor, config, make_registry(lambda: state.snapshot))
    jobs = {
        "basic": "    basic_auth:\n      username: prometheus\n"
        f"      password_file: {tmp_path / 'prom.password'}\n",
        "bearer": "    authorization:\n      type: Bearer\n"
        f"      credentials_file: {tmp_path / 'prom.token'}\n",
        "anonymous": "",
    }
    prom = Prometheus(tmp_path, f"127.0.0.1:{port.getHost().port}", jobs)
    try:

        def targets() -> dict[str, dict[str, Any]]:
            if prom.proc.poll() is not None:
                raise AssertionError(f"prometheus exited with {prom.proc.returncode}")
            active = prom.api("/api/v1/targets")["data"]["activeTargets"]
            return {t["labels"]["job"]: t for t in active if t["health"] != "unknown"}

        await wait_for(lambda: http_get(f"http://127.0.0.1:{prom.port}/-/ready"), 60, "ready")
        seen = await wait_for(lambda: len(targets()) == 3 and targets(), 60, "three scrapes")
        assert seen["basic"]["health"] == "up" and seen["bearer"]["health"] == "up"
        assert seen["anonymous"]["health"] == "down"
        assert "401" in seen["anonymous"]["lastError"]

        def series_jobs() -> set[str]:
            answer = prom.api("/api/v1/query", query="shyped_build_info")
            return {r["metric"]["job"] for r in answer["data"]["result"]}

        def both() -> set[str] | None:
            jobs = series_jobs()
            return jobs if {"basic", "bearer"} <= jobs else None

        await wait_for(both, 30, "series of both authenticated jobs")
        assert "anonymous" not in series_jobs()
    finally:
        prom.stop()
        await port.stopListening()
