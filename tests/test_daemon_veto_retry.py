"""A veto the toolstack fails to carry out stays pending and is retried (issue 11, finding 5;
issue 20, finding 1's "the failed veto is not retried"). The actuator is the configured xl
command: a wrapper that fails its first N runs, as a busy or descriptor-starved ``xl`` would,
then runs the sandbox's xl-compatible CLI (tests/test_vetoretry.py: backoff and records)."""

from __future__ import annotations

import sys
from pathlib import Path

import attrs
import pytest_twisted
from daemon_helpers import Harness, domcfg, eventually
from wiring_helpers import records, shypectl_verify, start, with_audit

from shyped.control.daemon_backend import DaemonControlBackend
from shyped.sandbox.xenstored import SandboxXenstored
from shyped.service.config import ActuatorConfig, Mode
from shyped.service.daemon import Daemon
from shyped.service.metrics import MetricsState
from shyped.service.metricsfamilies import families


def failing_xl(tmp: Path, xsd: SandboxXenstored, fails: int) -> Path:
    """An xl that fails its first `fails` runs (counted in a file), then works."""
    count = tmp / "xl-runs"
    script = tmp / "xl"
    script.write_text(
        "#!/bin/sh\n"
        f'n=$(cat "{count}" 2>/dev/null || echo 0); n=$((n+1)); echo "$n" > "{count}"\n'
        f'if [ "$n" -le {fails} ]; then echo "libxl: cannot destroy: busy ($n)" >&2; exit 1; fi\n'
        f'exec "{sys.executable}" -m shyped.sandbox --socket "{xsd.socket_path}" "$@"\n'
    )
    script.chmod(0o755)
    return script


async def rivals_with_failing_xl(
    harness: Harness, tmp: Path, fails: int
) -> tuple[Daemon, int, int]:
    """A daemon whose xl fails `fails` times; web-a1 admitted, then its rival web-b1 denied.
    Returns the daemon and both domids."""
    xl = failing_xl(tmp, harness.xsd, fails)
    config = attrs.evolve(harness.config(), actuator=ActuatorConfig("xl", (str(xl),)))
    daemon = await harness.start(config, in_process_actuator=False)
    a = await harness.call(harness.ts.create, domcfg("web-a1"))
    b = await harness.call(harness.ts.create, domcfg("web-b1"))
    await harness.settle()
    assert not harness.last(f"domain {b}").allowed
    return daemon, a, b


@pytest_twisted.ensureDeferred
async def test_a_failed_destroy_is_retried_until_the_denied_domain_is_gone(
    harness: Harness, tmp_path: Path
) -> None:
    daemon, _, _ = await rivals_with_failing_xl(harness, tmp_path, fails=2)
    daemon.metrics = MetricsState()
    assert "web-b1" in harness.domains()  # the first attempt failed
    # No new event, no SIGHUP, no restart: the retry alone destroys it.
    await eventually(lambda: "web-b1" not in harness.domains(), timeout=30)
    await eventually(lambda: not daemon.enforcer.vetoes.pending)
    assert daemon.enforcer.vetoes.failures == 2
    assert daemon.status().vetoes_pending == ()
    assert "web-a1" in harness.domains()
    snap = daemon.metrics.publish(daemon.host)
    series = {m.name: m.samples[0].value for m in families(snap) if m.samples}
    assert series["shyped_vetoes_pending"] == 0
    assert series["shyped_veto_failures"] == 2


@pytest_twisted.ensureDeferred
async def test_switching_to_permissive_drops_a_pending_veto(
    harness: Harness, tmp_path: Path
) -> None:
    daemon, _, _ = await rivals_with_failing_xl(harness, tmp_path, fails=1000)
    await eventually(lambda: bool(daemon.enforcer.vetoes.pending))
    (pending,) = daemon.status().vetoes_pending  # shown while pending
    assert pending["veto"] == "destroy" and "busy" in pending["error"]
    assert pending["failures"] >= 1
    (shown,) = DaemonControlBackend(daemon).status().vetoes_pending  # shypectl status
    assert shown.domid == pending["domid"] and shown.name == "web-b1"
    daemon.set_mode(Mode.PERMISSIVE)
    await eventually(lambda: not daemon.enforcer.vetoes.pending, timeout=30)
    assert "web-b1" in harness.domains()


@pytest_twisted.ensureDeferred
async def test_a_denied_domain_whose_veto_is_pending_still_counts_in_the_chinese_wall(
    harness: Harness, tmp_path: Path
) -> None:
    daemon, a, _ = await rivals_with_failing_xl(harness, tmp_path, fails=1000)
    await eventually(lambda: bool(daemon.enforcer.vetoes.pending))
    # Bank A's domain goes; bank B's denied domain still runs (its destroy keeps failing):
    # another bank A domain must not join it.
    await harness.call(harness.ts.destroy, a)
    await harness.settle()
    a2 = await harness.call(harness.ts.create, domcfg("batch-a1"))
    await harness.settle()
    out = harness.last(f"domain {a2}")
    assert not out.allowed and "bank-b" in out.decision.reason


@pytest_twisted.ensureDeferred
async def test_every_attempt_is_in_the_audit_trail_and_the_chain_verifies(
    harness: Harness, tmp_path: Path
) -> None:
    tries: list[int] = []

    def destroy(domid: int) -> None:  # xl destroy failing three times, then working
        tries.append(domid)
        if len(tries) <= 3:
            raise RuntimeError(f"libxl: cannot destroy: busy ({len(tries)})")
        harness.ts.destroy(domid)

    audit_dir = tmp_path / "audit"
    await start(harness, with_audit(harness.config(), audit_dir), destroy=destroy)
    await harness.call(harness.ts.create, domcfg("web-a1"))
    b = await harness.call(harness.ts.create, domcfg("web-b1"))
    await eventually(lambda: "web-b1" not in harness.domains(), timeout=30)
    await harness.stop()
    recs = [r for r in records(audit_dir) if r["kind"] == "veto-retry"]
    # The end is "done", or "gone" when the domain's removal reached the daemon first.
    assert [(r["result"], r["failures"]) for r in recs[:3]] == [("failed", n) for n in (1, 2, 3)]
    assert len(recs) == 4 and recs[3]["result"] in ("done", "gone") and recs[3]["failures"] == 3
    assert all(r["domid"] == b and r["veto"] == "destroy" for r in recs)
    assert "busy (1)" in recs[0]["error"] and recs[0]["retry_in"] > 0
    assert shypectl_verify(audit_dir).returncode == 0
