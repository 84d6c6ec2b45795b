"""conf/grafana-dashboard.json: valid JSON, every metric it queries is one the exporter produces
(checked against a full scrape), and every query is valid PromQL (promtool check rules)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hostmodel_helpers import from_snapshot, load_layout
from metrics_helpers import POLICY_SHA256, parse_scrape, scenario_policy
from prometheus_client import generate_latest

from shyped.policy.decisions import Decision, Hook, Rule
from shyped.service.metrics import MetricsState, XlDomain
from shyped.service.metricsfamilies import make_registry

DASHBOARD = Path(__file__).parent.parent / "conf" / "grafana-dashboard.json"
METRIC = re.compile(r"\bshyped_[a-z0-9_]+\b")
#: Grafana's variables, as Prometheus would see them once Grafana has substituted them.
GRAFANA_VARS = {"$__rate_interval": "1m", "$__range": "1h", "$instance": ".*", "$label": ".*"}


def load() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def panels(items: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for p in items:
        yield p
        yield from panels(p.get("panels", []))


def queries(dash: dict[str, Any]) -> list[str]:
    exprs = [t["expr"] for p in panels(dash["panels"]) for t in p.get("targets", [])]
    for var in dash["templating"]["list"]:
        if var["type"] == "query":
            exprs.append(var["definition"])
    return exprs


def exported_names() -> set[str]:
    """Sample names of a scrape in which every family has data (CPU time included)."""
    _, model, _ = from_snapshot(load_layout("layout-connected.txt", "vchan.txt"))
    state = MetricsState()
    state.set_policy(scenario_policy(), POLICY_SHA256, 1.0)
    state.set_mode("enforcing")
    state.set_xenstore(True, 0)
    state.observe_watch_events("domain_appeared")
    state.observe_decision(Decision(False, Hook.VCHAN, Rule.STE, "x"), 0.001)
    state.set_cpu_times([XlDomain("xsgold", 1, None, 1.0)])
    state.publish(model)
    text = generate_latest(make_registry(lambda: state.snapshot)).decode()
    return {name for name, _, _ in parse_scrape(text)}


def test_dashboard_is_valid_json_with_unique_panels_on_the_templated_datasource() -> None:
    dash = load()
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


def test_every_metric_the_dashboard_queries_is_exported() -> None:
    exprs = queries(load())
    used = {m for e in exprs for m in METRIC.findall(e)}
    assert used, "the dashboard queries no shyped metric"
    missing = used - exported_names()
    assert not missing, f"dashboard queries metrics the exporter does not produce: {missing}"
    # what the issue asks the dashboard to show
    for needed in (
        "shyped_decisions_total",
        "shyped_policy_info",
        "shyped_domain_memory_max_bytes",
        "shyped_quota_used",
    ):
        assert needed in used


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is not installed")
def test_every_dashboard_query_is_valid_promql(tmp_path: Path) -> None:
    rules = []
    for i, expr in enumerate(queries(load())):
        if expr.startswith("label_values("):
            continue  # a Grafana function, not PromQL
        for var, value in GRAFANA_VARS.items():
            expr = expr.replace(var, value)
        assert "$" not in expr, expr
        rules.append({"record": f"dashboard:query_{i}", "expr": expr})
    path = tmp_path / "rules.json"  # promtool reads YAML, and JSON is YAML
    path.write_text(json.dumps({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = subprocess.run(
        ["promtool", "check", "rules", str(path)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{len(rules)} rules found" in result.stdout
