"""Decisions/s through the daemon's real decision path with the audit trail on vs off.

A sandbox oxenstored holds N domains (each a vif, a vbd and a console, labelled; paused as
``xl create -p`` leaves them). A daemon starts, reconciles, and decides everything: N
admissions and 3N device decisions, each published label written to xenstore (enforcing mode,
so each label write waits for its audit record's fsync when the audit trail is on). The figure
is decisions per second from ``start()`` until ``settled()``. The daemon is started again and
again on the same xenstored, alternating audit off, audit on (fsync per group commit), and audit
on without fsync (the record-building cost alone); the median round of each is reported and the
audit-on rates as a fraction of the audit-off rate measured in the same run.

The audit directory lives under ``--dir`` (default /var/tmp: a disk, not tmpfs, so the fsync
is a real one); its file system type is printed.

Run: .venv/bin/python benchmarks/bench_daemon_audit.py [--domains 100] [--rounds 5] [--json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import attrs
from twisted.internet import defer, task

from shyped.core.engine import Outcome
from shyped.core.labelstore import load_label_store
from shyped.core.xlcfg import domain_config_from_text
from shyped.sandbox.toolstack import Toolstack
from shyped.sandbox.xenstored import SandboxXenstored, short_instance_dir
from shyped.service.auditlog import AsyncAuditLog, AuditLog
from shyped.service.config import ActuatorConfig, AuditConfig, Config, XenstoreConfig
from shyped.service.daemon import Daemon, load_policy
from shyped.xenstore import GatewayConfig, XenstoreGateway

ROOT = Path(__file__).resolve().parent.parent
POLICY = ROOT / "conf" / "policies" / "hosting.toml"


def fs_type(path: Path) -> str:
    best, kind = "", "?"
    with open("/proc/mounts") as f:
        for line in f:
            _dev, mnt, typ, *_ = line.split()
            if str(path).startswith(mnt) and len(mnt) > len(best):
                best, kind = mnt, typ
    return kind


def write_labels(path: Path, n: int) -> None:
    doc: dict[str, Any] = {
        "version": 1,
        "domains": {"name": {f"batch-{i}": "bank-a-batch" for i in range(n)}},
        "resources": {f"disk:/srv/xen/images/batch-{i}.img": "bank-a-disk" for i in range(n)},
    }
    doc["resources"]["bridge:xenbr-bank-a"] = "xenbr-bank-a"
    path.write_text(json.dumps(doc))


def domain(i: int) -> Any:
    return domain_config_from_text(
        f'name = "batch-{i}"\nmemory = 128\n'
        "vif = ['bridge=xenbr-bank-a']\n"
        f"disk = ['format=raw,vdev=xvda,access=rw,target=/srv/xen/images/batch-{i}.img']\n",
        f"batch-{i}.cfg",
    )


class NoActuator:
    """Nothing is vetoed in this scenario; the actuator is never called."""

    def pause(self, domid: int) -> defer.Deferred[None]:
        return defer.succeed(None)

    unpause = destroy = pause


async def one_round(
    reactor: Any, xsd: SandboxXenstored, config: Config, audit: str, directory: Path
) -> tuple[float, int]:
    """(seconds from start to settled, decisions) for one daemon start."""
    log = None
    if audit != "off":
        shutil.rmtree(directory, ignore_errors=True)
        settings = attrs.evolve(config.audit, enabled=True, directory=directory).settings()
        log = AsyncAuditLog(AuditLog(settings, durable=audit == "on"), reactor)
    gateway = XenstoreGateway(GatewayConfig(socket_path=str(xsd.socket_path)), reactor=reactor)
    daemon = Daemon(
        config,
        load_policy(config.policy),
        load_label_store(config.labels),
        reactor=reactor,
        gateway=gateway,
        actuator=NoActuator(),
        audit=log,
    )
    decided: list[Outcome] = []
    daemon.add_listener(decided.append)
    t = time.perf_counter()
    await daemon.start()
    await daemon.settled()
    elapsed = time.perf_counter() - t
    await daemon.stop()
    if any(not o.allowed for o in decided):
        raise RuntimeError("a decision was a denial: the scenario is wrong")
    return elapsed, len(decided)


async def run(reactor: Any, args: argparse.Namespace) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="bench-daemon-audit-", dir=args.dir))
    xsd_dir = short_instance_dir("bench-da")
    xsd = SandboxXenstored(xsd_dir)
    xsd.start()
    try:
        ts = Toolstack(xsd.socket_path)
        ts.boot_host()
        for i in range(args.domains):
            ts.create(domain(i))
        labels = work / "labels.json"
        write_labels(labels, args.domains)
        config = Config(
            policy=POLICY,
            labels=labels,
            xenstore=XenstoreConfig(socket=xsd.socket_path),
            actuator=ActuatorConfig(kind="sandbox"),
            audit=AuditConfig(),
        )
        rates: dict[str, list[float]] = {"off": [], "on": [], "nofsync": []}
        count = 0
        await one_round(reactor, xsd, config, "off", work / "audit")  # warm-up
        for _ in range(args.rounds):
            for mode in rates:
                elapsed, count = await one_round(reactor, xsd, config, mode, work / "audit")
                rates[mode].append(count / elapsed)
    finally:
        xsd.stop()
        shutil.rmtree(xsd_dir, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in rates.items()}
    return {
        "domains": args.domains,
        "decisions_per_start": count,
        "audit_fs": fs_type(Path(args.dir)),
        "decisions_per_s_audit_off": round(med["off"], 1),
        "decisions_per_s_audit_on": round(med["on"], 1),
        "decisions_per_s_audit_no_fsync": round(med["nofsync"], 1),
        "ratio_on_vs_off": round(med["on"] / med["off"], 3),
        "ratio_no_fsync_vs_off": round(med["nofsync"] / med["off"], 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--domains", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--dir", default="/var/tmp", help="where the audit directory goes")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    async def go(reactor: Any) -> None:
        out = await run(reactor, args)
        if args.json:
            print(json.dumps(out, indent=2))
        else:
            for k, v in out.items():
                print(f"{k:32} {v}")
        sys.stdout.flush()  # task.react exits the process

    task.react(lambda r: defer.ensureDeferred(go(r)))


if __name__ == "__main__":
    main()
