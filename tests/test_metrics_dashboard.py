"""conf/grafana-dashboard.json: valid JSON, every metric it queries is one the exporter produces
(checked against a full scrape), and every query is valid PromQL (promtool check rules)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from audit_helpers import small
from hostmodel_helpers import from_snapshot, load_layout
from metrics_helpers import (
    METRIC,
    POLICY_SHA256,
    full_meter,
    load_dashboard,
    panels,
    parse_scrape,
    promql,
    queries,
    scenario_policy,
)
from prometheus_client import generate_latest

from shyped.core.metering import LabelUse
from shyped.policy.decisions import Decision, Hook, Rule
from shyped.service.auditlog import AuditCollector, AuditLog
from shyped.service.metrics import MetricsState
from shyped.service.metricsfamilies import make_registry


def exported_names(audit_dir: Path) -> set[str]:
    """Sample names of a scrape in which every family has data (CPU time and the audit
    trail's included)."""
    _, model, _ = from_snapshot(load_layout("layout-connected.txt", "vchan.txt"))
    state = MetricsState()
    state.set_policy(scenario_policy(), POLICY_SHA256, 1.0)
    state.set_mode("enforcing")
    state.set_xenstore(True, 0)
    state.observe_watch_events("domain_appeared")
    state.observe_decision(Decision(False, Hook.VCHAN, Rule.STE, "x"), 0.001)
    state.set_metering("xenstat", full_meter(1, "xsgold"))
    state.set_label_use({"web": LabelUse("web", 1, 0.5, 1, 1)})
    state.publish(model)
    registry = make_registry(lambda: state.snapshot)
    registry.register(AuditCollector(AuditLog(small(audit_dir), durable=False)))
    text = generate_latest(registry).decode()
    return {name for name, _, _ in parse_scrape(text)}


def test_dashboard_is_valid_json_with_unique_panels_on_the_templated_datasource() -> None:
    dash = load_dashboard()
    assert dash["uid"] and dash["title"]
    all_panels = list(panels(dash["panels"]))
    ids = [p["id"] for p in all_panels]
    assert len(ids) == len(set(ids))
    for p in all_panels:
        if p["type"] == "row":
            continue
        assert p["targets"], p["title"]
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert {"x", "y", "w", "h"} <= set(p["gridPos"])
        assert p["gridPos"]["x"] + p["gridPos"]["w"] <= 24
    kinds = {p["type"] for p in all_panels}
    assert {"timeseries", "stat", "bargauge", "table"} <= kinds


def test_every_metric_the_dashboard_queries_is_exported(tmp_path: Path) -> None:
    exprs = queries(load_dashboard())
    used = {m for e in exprs for m in METRIC.findall(e)}
    assert used, "the dashboard queries no shyped metric"
    missing = used - exported_names(tmp_path)
    assert not missing, f"dashboard queries metrics the exporter does not produce: {missing}"
    # what the issue asks the dashboard to show
    for needed in (
        "shyped_decisions_total",
        "shyped_policy_info",
        "shyped_domain_memory_max_bytes",
        "shyped_quota_memory_used_bytes",
        "shyped_audit_healthy",
        "shyped_xen_domain_cpu_seconds_total",
        "shyped_xen_domain_memory_bytes",
        "shyped_xen_vif_receive_bytes_total",
        "shyped_xen_vbd_write_bytes_total",
        "shyped_xen_metering_up",
        "shyped_quota_cpu_used_ratio",
        "shyped_quota_label_memory_limit_bytes",
    ):
        assert needed in used
    # every per-domain series but the info one is joined for the domain's name or label
    for e in exprs:
        if (
            re.search(r"shyped_(domain_(?!info)|xen_(domain|vif|vbd))", e)
            and "label_values" not in e
        ):
            assert "group_left" in e and "shyped_domain_info" in e, e


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is not installed")
def test_every_dashboard_query_is_valid_promql(tmp_path: Path) -> None:
    rules = []
    for i, expr in enumerate(queries(load_dashboard())):
        if expr.startswith("label_values("):
            continue  # a Grafana function, not PromQL
        expr = promql(expr)
        assert "$" not in expr, expr
        rules.append({"record": f"dashboard:query_{i}", "expr": expr})
    path = tmp_path / "rules.json"  # promtool reads YAML, and JSON is YAML
    path.write_text(json.dumps({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = subprocess.run(
        ["promtool", "check", "rules", str(path)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{len(rules)} rules found" in result.stdout
