"""Helpers for the audit/metrics/quota wiring tests: a daemon started like `shyped.cli.main` does
(audit trail and metrics endpoint built from the configuration by `shyped.service.observability`)
inside the in-process `daemon_helpers.Harness`, policies with quotas, and reading records."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
from daemon_helpers import HOSTING, LABELS, Harness
from twisted.internet import reactor, threads

from shyped.core.labelstore import load_label_store
from shyped.service.actuator import SandboxActuator
from shyped.service.auditlog import list_log_files, read_lines
from shyped.service.config import AuditConfig, Config, MetricsConfig
from shyped.service.daemon import Daemon, load_policy
from shyped.service.flaskxen import FlaskXen
from shyped.service.observability import Metrics, build_audit, build_metrics
from shyped.xenstore import GatewayConfig, XenstoreGateway

ROOT = Path(__file__).resolve().parents[1]


def with_audit(config: Config, directory: Path, **kw: Any) -> Config:
    return attrs.evolve(config, audit=AuditConfig(enabled=True, directory=directory, **kw))


def with_metrics(config: Config) -> Config:
    return attrs.evolve(
        config,
        metrics=MetricsConfig(
            enabled=True, address="127.0.0.1", port=0, allow_unauthenticated=True
        ),
    )


async def start(
    h: Harness,
    config: Config,
    *,
    destroy: Callable[[int], object] | None = None,
    flask: FlaskXen | None = None,
) -> tuple[Daemon, Metrics | None]:
    """A daemon with the audit trail and metrics its configuration asks for (`destroy`:
    instead of the toolstack's, for the domain veto; `flask`: Xen's FLASK edge, by default
    the real one, which finds no Xen here)."""
    audit = build_audit(config, reactor)
    metrics = build_metrics(config, reactor, audit)
    gateway = XenstoreGateway(
        GatewayConfig(socket_path=str(h.xsd.socket_path), reconnect_initial=0.02, reconnect_max=0.2)
    )
    daemon = Daemon(
        config,
        load_policy(config.policy),
        load_label_store(config.labels),
        gateway=gateway,
        actuator=SandboxActuator(h.ts.pause, h.ts.unpause, destroy or h.ts.destroy),
        audit=audit,
        metrics=None if metrics is None else metrics.state,
        flask=flask,
    )
    daemon.add_listener(h.outcomes.append)
    h.daemon = daemon
    if metrics is not None:
        metrics.start()
    await daemon.start()
    await daemon.settled()
    return daemon, metrics


async def scrape(metrics: Metrics) -> str:
    """GET /metrics over HTTP from a worker thread (the reactor serves it)."""
    port = metrics.port.getHost().port

    def get() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            body: bytes = r.read()
        return body.decode()

    text: str = await threads.deferToThread(get)
    return text


def records(directory: Path) -> list[dict[str, Any]]:
    """Every record of the audit log in `directory`, in order."""
    out = []
    for path in list_log_files(directory):
        out.extend(json.loads(line) for line in read_lines(path) if line.strip())
    return out


def shypectl_verify(directory: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "shyped.cli.shypectl", "audit", "--dir", str(directory), "verify"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )


def quota_policy(tmp: Path, quotas: dict[str, dict[str, int]], version: str | None = None) -> Path:
    """hosting.toml with `[label.quota]` tables set for the labels named (replacing theirs)."""
    lines = HOSTING.read_text().splitlines()
    out: list[str] = []
    current: str | None = None
    skipping = False
    versioned = version is None
    for line in lines:
        stripped = line.strip()
        if skipping and (stripped.startswith("[") or stripped == ""):
            skipping = False
        if skipping:
            continue
        if stripped == "[label.quota]" and current in quotas:
            skipping = True
            continue
        if stripped.startswith("[") and current in quotas:
            out.extend(_quota_table(quotas[current]))
            current = None
        if stripped.startswith("name = ") and out and out[-1].strip() == "[[label]]":
            current = stripped.split("=", 1)[1].strip().strip('"')
        if not versioned and stripped.startswith("version = "):
            line, versioned = f'version = "{version}"', True
            out.append(line)
            line = 'from = { name = "example.hosting", version = "1.0" }'
        out.append(line)
    if current in quotas:
        out.extend(_quota_table(quotas[current]))
    path = tmp / "policy.toml"
    path.write_text("\n".join(out) + "\n")
    return path


def _quota_table(q: dict[str, int]) -> list[str]:
    return ["[label.quota]", *(f"{k} = {v}" for k, v in q.items()), ""]


def labels_with(tmp: Path, names: dict[str, str]) -> Path:
    """conf/labels.json with more domain name assignments."""
    doc = json.loads(LABELS.read_text())
    doc["domains"]["name"].update(names)
    path = tmp / "labels.json"
    path.write_text(json.dumps(doc))
    return path
