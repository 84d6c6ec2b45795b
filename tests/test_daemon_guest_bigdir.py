"""A guest's own directory listed larger than the gateway accepted must not blind the daemon
(red-team finding, redteam-guest; DESIGN.md §2 "Trust").

oxenstored answers a dom0 DIRECTORY whole, however long: a guest's directory can be as long as
its node quota times the path limit (``quota-maxentity`` x ``quota-path-max``; 2,000 x 1,024
here, XenServer ships 8,192 nodes). The gateway refused any reply over 1 MiB as "a corrupted
stream" and dropped the connection. The guest forces a reconcile of its tree (a backlog past
its bound, as in tests/test_daemon_guest_flood.py); the reconcile's DIRECTORY dropped the
connection, and the grant among the dropped paths (to a domain of another customer) was never
decided. A daemon started while such a directory exists failed its start scan the same way.

The guest writes only below its own ``data/`` (which it owns on real Xen), within a node
quota an administrator may set.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator

import pytest
import pytest_twisted
from daemon_helpers import Harness, domcfg
from twisted.internet import defer, reactor

from shyped.core.fairbatch import FairBatches
from shyped.policy.decisions import Rule
from shyped.sandbox.xenstored import SandboxXenstored, short_instance_dir
from shyped.sandbox.xsconn import XsConn

#: oxenstored's quota-maxentity on this host (Debian ships 1,000; XenServer 8,192).
QUOTA = 2000
#: The children the guest makes in one directory (within QUOTA with the nodes it has).
CHILDREN = 1100
#: How long the daemon may take to settle (it never did before the fix).
SETTLE = 60.0


@pytest.fixture(name="roomy")
def roomy_fixture() -> Iterator[Harness]:
    """A booted sandbox host whose xenstored allows QUOTA nodes per domain."""
    directory = short_instance_dir()
    xsd = SandboxXenstored(directory, config={"quota-maxentity": QUOTA})
    xsd.start()
    try:
        h = Harness.boot(xsd)
        try:
            yield h
        finally:
            pytest_twisted.blockon(defer.ensureDeferred(h.stop()))
    finally:
        xsd.stop()
        shutil.rmtree(directory, ignore_errors=True)


async def settle(host: Harness) -> None:
    assert host.daemon is not None
    d = host.daemon.settled()
    d.addTimeout(SETTLE, reactor)
    await d


@pytest_twisted.ensureDeferred
async def test_a_guest_directory_longer_than_a_mebibyte_does_not_blind_the_daemon(
    roomy: Harness,
) -> None:
    host = roomy
    await host.start()
    daemon = host.daemon
    assert daemon is not None
    daemon._pending = FairBatches(per_domain=8, max_waiting=100)
    a = await host.call(host.ts.create, domcfg("web-a1"))  # bank-a: the hostile guest
    s = await host.call(host.ts.create, domcfg("shop-1"))  # no STE type shared with web-a1
    await settle(host)
    reconnects = daemon.gateway.reconnects
    big = f"/local/domain/{a}/data/x"
    room = 1024 - len(big) - 1  # quota-path-max: the longest child name the guest may use
    early = f"/local/domain/{a}/data/early/ring-ref"  # among the paths its backlog drops
    with XsConn(str(host.xsd.socket_path)) as xs:  # one burst past the backlog's bound
        xs.write(early, "1")
        xs.set_perms(early, (f"n{a}", f"r{s}"))
        for i in range(CHILDREN):
            xs.write(f"{big}/{str(i).rjust(room, 'k')}", "1")
    await settle(host)

    assert daemon._pending.overflows >= 1
    # The guest's tree was read again, whole: the dropped grant was decided and reset.
    out = host.last(f"xs-channel {early}")
    assert not out.allowed and [c.domid for c in out.clients] == [s]
    assert host.perms(early) == (f"n{a}",)
    assert daemon.gateway.reconnects == reconnects  # the connection was never dropped
    # And the daemon still decides: a domain conflicting with running bank-a is vetoed.
    rival = await host.call(host.ts.create, domcfg("web-b1"))
    await settle(host)
    out = host.last(f"domain {rival}")
    assert not out.allowed and out.decision.rule is Rule.CHINESE_WALL
    assert "web-b1" not in host.domains()
