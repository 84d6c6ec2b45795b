"""A guest filling its own directory past one message must not blind the daemon on Xen's C
xenstored (red-team finding, robust; DESIGN.md §2 "Trust").

The C xenstored answers a DIRECTORY longer than 4,096 bytes with E2BIG (oxenstored answers it
whole: tests/test_daemon_guest_bigdir.py). A guest owns what it creates below its home, up
to its node quota (``--entry-nb``, 1,000 by default), so it can make such a directory at
will: a few hundred children. The daemon's reconcile walk (at start, and whenever a guest
floods its watch past its backlog, its tree is read again) failed on that E2BIG: the walk
never finished, and a grant the guest published meanwhile, to a domain of another customer,
was never decided.
Now the walk reads that list in parts (`shyped.xenstore.listing`).

The guest writes only below its own ``data/``, which it owns on real Xen.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import pytest_twisted
from cxenstored_helpers import CXENSTORED, CXenstored
from daemon_helpers import Harness, domcfg
from twisted.internet import defer, reactor

from shyped.core.fairbatch import FairBatches
from shyped.sandbox.xsconn import XsConn

pytestmark = pytest.mark.skipif(
    not CXENSTORED.exists(), reason=f"{CXENSTORED} (Debian xen-utils-4.17) not installed"
)

#: Children the guest makes in one directory: some 8 KiB of names, two messages and more.
CHILDREN = 900
#: How long the daemon may take to settle (it never did before the fix).
SETTLE = 60.0


@pytest.fixture(name="chost")
def chost_fixture() -> Iterator[Harness]:
    """A booted sandbox host on the C xenstored (2,000 nodes per domain)."""
    with CXenstored("--entry-nb", "2000") as xsd:
        h = Harness.boot(xsd)  # type: ignore[arg-type]
        try:
            yield h
        finally:
            pytest_twisted.blockon(defer.ensureDeferred(h.stop()))


async def settle(host: Harness) -> None:
    assert host.daemon is not None
    d = host.daemon.settled()
    d.addTimeout(SETTLE, reactor)
    await d


def fill(host: Harness, directory: str, count: int) -> None:
    with XsConn(str(host.xsd.socket_path)) as xs:
        for i in range(count):
            xs.write(f"{directory}/entry-{i:06d}", "1")


@pytest_twisted.ensureDeferred
async def test_a_guest_directory_past_one_message_does_not_stop_the_reconcile(
    chost: Harness,
) -> None:
    host = chost
    await host.start()
    daemon = host.daemon
    assert daemon is not None
    daemon._pending = FairBatches(per_domain=8, max_waiting=100)
    a = await host.call(host.ts.create, domcfg("web-a1"))  # bank-a: the hostile guest
    s = await host.call(host.ts.create, domcfg("shop-1"))  # no STE type shared with web-a1
    await settle(host)
    early = f"/local/domain/{a}/data/early/ring-ref"  # among the paths its backlog drops
    with XsConn(str(host.xsd.socket_path)) as xs:
        xs.write(early, "1")
        xs.set_perms(early, (f"n{a}", f"r{s}"))
    fill(host, f"/local/domain/{a}/data/x", CHILDREN)  # one burst, past its backlog's bound
    await settle(host)

    assert daemon._pending.overflows >= 1
    # The guest's tree was read again whole: the dropped grant was decided and reset.
    out = host.last(f"xs-channel {early}")
    assert not out.allowed and [c.domid for c in out.clients] == [s]
    assert host.perms(early) == (f"n{a}",)


@pytest_twisted.ensureDeferred
async def test_a_daemon_starts_on_a_host_where_a_guest_filled_its_directory(
    chost: Harness,
) -> None:
    host = chost
    a = host.ts.create(domcfg("web-a1"))
    s = host.ts.create(domcfg("shop-1"))
    fill(host, f"/local/domain/{a}/data/x", CHILDREN)
    grant = f"/local/domain/{a}/data/x/entry-000007"
    with XsConn(str(host.xsd.socket_path)) as xs:
        xs.set_perms(grant, (f"n{a}", f"r{s}"))
    await host.start()  # its start is a reconcile of everything there
    out = host.last(f"xs-channel {grant}")
    assert not out.allowed and [c.domid for c in out.clients] == [s]
    assert host.perms(grant) == (f"n{a}",)
