"""Helpers for the metrics tests: a sandbox scenario fed through the real parser, a small
decision loop standing in for the daemon's engine (real `PolicyEngine` and quota checks),
reading scrapes back, and running promtool."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from shyped.core.accounting import account_domain
from shyped.core.events import Event
from shyped.core.host import HostModel
from shyped.core.hostfacts import NeedsDecision
from shyped.core.metering import DomainMeter, MeterSample, VbdCounters, VcpuTime, VifCounters
from shyped.core.quota import check, running_with_label
from shyped.core.xlcfg import DomainConfig, parse_disk_spec, parse_vif_spec
from shyped.policy.decisions import Decision, Hook, PolicyEngine
from shyped.policy.model import Policy, PolicyVersion, Quota, VmLabel
from shyped.sandbox.toolstack import Toolstack
from shyped.service.metrics import MetricsState

POLICY_TEXT = "test policy for the metrics scenario"
POLICY_SHA256 = hashlib.sha256(POLICY_TEXT.encode()).hexdigest()
MIB = 1024 * 1024

#: The scenario's domains: name -> label.
LABELS = {"web1": "web", "web2": "web", "db1": "db"}


def scenario_policy() -> Policy:
    """web may run 2 domains of up to 256 MiB (and has a limit of every kind); db domains get
    64 MiB (db1 asks for 128)."""
    return Policy(
        "metrics.test",
        PolicyVersion(1, 2),
        "dom0",
        ste_types=("system", "web", "db"),
        vm_labels=(
            VmLabel("dom0", {"system", "web", "db"}),
            VmLabel(
                "web",
                {"web"},
                quota=Quota(
                    max_domains=2,
                    max_memory_mib=256,
                    max_vcpus=4,
                    max_devices=16,
                    max_vchans=8,
                    max_event_channels=64,
                    max_grant_refs=64,
                    max_label_memory_mib=1024,
                    max_cpu_percent=200,
                ),
            ),
            VmLabel("db", {"db"}, quota=Quota(max_memory_mib=64)),
        ),
    )


def domain_config(name: str, n: int, memory_mb: int, **kw: Any) -> DomainConfig:
    return DomainConfig(
        name=name,
        uuid=f"6f1b1c9e-2a4d-4c55-9e0e-5ca1ab1e{n:04d}",
        memory_mb=memory_mb,
        kernel="/guest/vmlinuz",
        **kw,
    )


def build_scenario(ts: Toolstack) -> dict[str, int]:
    """Three guests: web1 (disk, nic, 2 of 4 vCPUs, running), db1 (over its memory quota,
    paused), web2 (nic, running, client of a vchan web1 serves). Returns name -> domid."""
    ts.boot_host()
    web1 = ts.create(
        domain_config(
            "web1",
            1,
            128,
            vcpus=2,
            maxvcpus=4,
            disks=(parse_disk_spec("format=raw,vdev=xvda,access=rw,target=/images/web1.img"),),
            vifs=(parse_vif_spec("bridge=xenbr0"),),
        )
    )
    db1 = ts.create(domain_config("db1", 2, 128, vifs=(parse_vif_spec("bridge=xenbr0"),)))
    web2 = ts.create(domain_config("web2", 3, 256, vifs=(parse_vif_spec("bridge=xenbr0"),)))
    ts.unpause(web1)
    ts.unpause(web2)
    ts.vchan_listen(web1, web2, port=5)
    return {"web1": web1, "db1": db1, "web2": web2}


class Decider:
    """Answers the host model's questions as the daemon's engine would, recording metrics."""

    def __init__(self, policy: Policy, state: MetricsState) -> None:
        self.policy = policy
        self.engine = PolicyEngine(policy)
        self.state = state
        self.decisions: list[Decision] = []

    def _decide(self, model: HostModel, need: NeedsDecision) -> tuple[Decision, str | None]:
        if need.kind == "domain":
            label = LABELS[need.name or ""]
            acc = account_domain(model, need.domid)
            assert acc is not None
            others = running_with_label(model, label, exclude=need.domid)
            hook = Hook.DOMAIN_ADMIT
            return check(self.policy, label, acc, hook=hook, others_running=others), label
        me = model.domain(need.domid)
        assert me is not None
        hook = Hook.DEVICE_CHANNEL if need.kind == "device" else Hook.VCHAN
        d: Decision | None = None
        for peer in need.peers:
            other = model.domain(peer)
            d = self.engine.channel(hook, me.label, other.label if other else None)
            if not d.permitted:
                return d, None
        acc = account_domain(model, need.domid)
        assert acc is not None
        q = check(self.policy, me.label, acc, hook=hook)
        return (q if not q.permitted or d is None else d), None

    def run(self, model: HostModel, events: Iterable[Event]) -> None:
        events = list(events)
        self.state.observe_events(events)
        queue = [o for o in model.apply_all(events) if isinstance(o, NeedsDecision)]
        while queue:
            need = queue.pop(0)
            start = time.perf_counter()
            decision, label = self._decide(model, need)
            latency = time.perf_counter() - start
            self.decisions.append(decision)
            self.state.observe_decision(decision, latency)
            queue.extend(
                model.record_decision(need, decision.permitted, label=label, reason=decision.reason)
            )


def full_meter(
    domid: int, name: str, *, taken_at: float = 100.0, cpu_ns: int = 7_250_000_000
) -> MeterSample:
    """A libxenstat sample of one domain with every field measured (as on a real dom0)."""
    return MeterSample(
        taken_at,
        "xenstat",
        (
            DomainMeter(
                domid,
                name,
                None,
                cpu_ns,
                vcpus=(VcpuTime(0, True, cpu_ns - 250_000_000), VcpuTime(1, False, 250_000_000)),
                memory_bytes=130 * MIB,
                memory_max_bytes=256 * MIB,
                vifs=(VifCounters(0, 1000, 10, 2000, 20),),
                vbds=(VbdCounters(51712, 5, 7, 40, 56),),
            ),
        ),
    )


# ---- the Grafana dashboard ---------------------------------------------------------------------

DASHBOARD = Path(__file__).parent.parent / "conf" / "grafana-dashboard.json"
METRIC = re.compile(r"\bshyped_[a-z0-9_]+\b")
#: Grafana's variables, as Prometheus would see them once Grafana has substituted them.
GRAFANA_VARS = {"$__rate_interval": "1m", "$__range": "1h", "$instance": ".*", "$label": ".*"}


def load_dashboard() -> dict[str, Any]:
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


def promql(expr: str, grafana_vars: dict[str, str] = GRAFANA_VARS) -> str:
    """A dashboard query as Prometheus sees it once Grafana substituted its variables."""
    for var, value in grafana_vars.items():
        expr = expr.replace(var, value)
    return expr


# ---- reading scrapes --------------------------------------------------------------------------

Sample = tuple[str, dict[str, str], float]


def parse_scrape(text: str) -> list[Sample]:
    return [
        (s.name, dict(s.labels), s.value)
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    ]


def values(samples: list[Sample], metric: str, /, **match: str) -> list[float]:
    """Values of the samples called `metric` whose labels include `match`."""
    return [
        v
        for n, labels, v in samples
        if n == metric and all(labels.get(k) == x for k, x in match.items())
    ]


def value(samples: list[Sample], metric: str, /, **match: str) -> float:
    """The one value of `metric` matching `match` (fails unless exactly one sample matches)."""
    found = values(samples, metric, **match)
    assert len(found) == 1, f"{metric} {match}: {found}"
    return found[0]


def http_get(url: str, timeout: float = 10.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        data: bytes = resp.read()
        return data


def promtool_check(text: bytes) -> subprocess.CompletedProcess[bytes]:
    tool = shutil.which("promtool")
    assert tool is not None, "promtool (Debian package prometheus) is required"
    return subprocess.run(
        [tool, "check", "metrics"], input=text, capture_output=True, timeout=60, check=False
    )
