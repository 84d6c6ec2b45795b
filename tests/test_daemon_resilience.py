"""The daemon under trouble: xenstored restarted under it, a guest flooding xenstore."""

from __future__ import annotations

import subprocess
import sys

import pytest_twisted
from daemon_helpers import POLICY, Harness, domcfg, eventually, host_fixture

from shyped.sandbox.xenstored import SandboxXenstored

__all__ = ["host_fixture"]  # the `host` fixture


def restart(xsd: SandboxXenstored) -> None:
    xsd.stop()
    xsd.start()


@pytest_twisted.ensureDeferred
async def test_a_restarted_xenstored_is_reconciled_and_decisions_go_on(host: Harness) -> None:
    daemon = await host.start()
    await host.call(host.ts.create, domcfg("web-a1"))
    await host.settle()
    assert daemon.engine.running.running_labels() == {"dom0": 1, "bank-a-web": 1}
    reconnects = daemon.gateway.reconnects
    await host.call(restart, host.xsd)  # a fresh store: every tree is gone
    await eventually(lambda: daemon.gateway.reconnects > reconnects and daemon.gateway.connected)
    await host.settle()
    assert daemon.status().reconciles >= 2
    assert daemon.engine.running.running_labels() == {
        "dom0": 1
    }  # web-a1's tree went with the store
    assert host.read("/local/domain/0/shyped/label") == f"ACM:{POLICY}:dom0"  # published again
    await host.call(host.ts.boot_host)
    b = await host.call(host.ts.create, domcfg("web-b1"))
    await host.settle()
    assert host.last(f"domain {b}").allowed
    assert host.read(f"/local/domain/{b}/shyped/label") == f"ACM:{POLICY}:bank-b-web"


@pytest_twisted.ensureDeferred
async def test_settled_without_a_connection_waits_for_the_reconnects_reconcile(
    host: Harness,
) -> None:
    """`settled()`'s barrier read fails while xenstored is gone: it must not report the daemon
    settled then (nothing of the new store has been read), but wait for the reconcile."""
    daemon = await host.start()
    await host.call(host.ts.create, domcfg("web-a1"))
    await host.settle()
    reconciles = daemon.status().reconciles
    await host.call(host.xsd.stop)
    await eventually(lambda: daemon.gateway.reconnecting)
    settled = daemon.settled()
    await host.call(host.xsd.start)
    await settled
    assert daemon.status().reconciles > reconciles
    assert daemon.engine.running.running_labels() == {"dom0": 1}


@pytest_twisted.ensureDeferred
async def test_a_flooding_guest_does_not_keep_others_from_being_decided(host: Harness) -> None:
    daemon = await host.start()
    noisy = await host.call(host.ts.create, domcfg("shop-1"), paused=False)
    await host.settle()
    received = daemon.gateway.stats().events.received
    # 500 distinct keys (the guest's node quota is 1000) at 5,000 writes/s for 4 s.
    flood = subprocess.Popen(
        [sys.executable, "-m", "shyped.xenstore.rawclient", "flood", "--socket",
         str(host.xsd.socket_path), "--prefix", f"/local/domain/{noisy}/data", "--rate",
         "5000", "--duration", "4", "--distinct", "500"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        await eventually(lambda: daemon.status().batches > 20 or flood.poll() is not None)
        a = await host.call(host.ts.create, domcfg("web-a1"))
        b = await host.call(host.ts.create, domcfg("web-b1"))
        await eventually(lambda: bool(host.decided(f"domain {b}")), timeout=30)
        assert host.last(f"domain {a}").allowed
        assert not host.last(f"domain {b}").allowed
    finally:
        flood.communicate(timeout=60)
    await host.settle()
    assert "web-b1" not in host.domains()
    assert daemon.gateway.connected
    # The flood was real (xenstored may cut a client that outruns it on a loaded machine, so
    # its exit status is not the point), and it produced no decision of its own.
    assert daemon.gateway.stats().events.received - received > 2_000
    assert not any(o.what.startswith(f"vchan /local/domain/{noisy}/") for o in host.outcomes)
    assert {o.what for o in host.outcomes} >= {f"domain {a}", f"domain {b}"}
