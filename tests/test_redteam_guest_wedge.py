"""A guest that watches its home and never reads its ring must not wedge the daemon's
xenstore connection (red-team finding, redguest; DESIGN.md §2 "Trust").

oxenstored 4.17 (since XSA-326, ``tools/ocaml/xenstored/connection.ml``) queues the watch
events a connection's request fires until every watcher has room: the watcher's output
(``quota-maxwatchevents`` = 1,024 events) and each of its watches' own pipe (as many again).
While events wait, it reads no further request from the writer, and it only looks at them
again when that writer is processed again: a writer waiting for a reply never is. A guest
may register 100 watches on its home (``quota-maxwatch``) and stop reading its ring; every
write into its home then queues 100 events for it. Its own grants (``SET_PERMS`` naming a
domain it shares no STE type with) make the daemon reset them, in its home: some 520 grants
and resets later its queues are full. The daemon's next reset there wedged the connection
the daemon's vetoes ran on, its watch connection, for good: every later veto (a reset of
another customer's grant) waited forever, and that grant stayed open.

Now the daemon's vetoes run each on a connection of their own, closed when they end: the
write that overflowed the guest's queues still ends, and nothing waits behind it.

The guest here is a socket client (the sandbox has no guest rings) that does what a guest
may do on its ring: watch its home, and set permissions on nodes it owns below ``data/``;
100 watches and 800 requests unanswered are within Debian's quotas for a guest.
"""

from __future__ import annotations

import contextlib
import socket
import threading

import pytest
import pytest_twisted
from daemon_helpers import Harness, domcfg, eventually, host_fixture

from shyped.policy.decisions import Rule
from shyped.sandbox.xenstored import SandboxXenstored
from shyped.sandbox.xsconn import XsConn
from shyped.xenstore import ConnectionLost, GatewayConfig, Op, XenstoreGateway, wire

__all__ = ["host_fixture"]  # the `host` fixture

#: Watches the guest registers on its home (oxenstored's quota-maxwatch for a guest).
WATCHES = 100
#: Grants the guest publishes without reading a reply (each reset by the daemon).
GRANTS = 700
#: How long the daemon may take for what is asserted (it never did before the fix).
WAIT = 60.0


def _send(sock: socket.socket, data: bytes) -> None:
    """The guest's requests, from a thread: oxenstored stops reading the guest's connection."""
    with contextlib.suppress(OSError):  # closed at the end of the test
        sock.sendall(data)


@pytest_twisted.ensureDeferred
async def test_a_guest_that_never_reads_its_watch_events_does_not_wedge_the_daemons_vetoes(
    host: Harness,
) -> None:
    await host.start()
    a = await host.call(host.ts.create, domcfg("web-a1"))  # bank-a: the hostile guest
    s = await host.call(host.ts.create, domcfg("shop-1"))  # no STE type shared with bank-a
    b = await host.call(host.ts.create, domcfg("batch-a1"))  # bank-a: another customer VM
    await host.settle()
    home = f"/local/domain/{a}"
    nodes = [f"{home}/data/g{i}" for i in range(GRANTS)]
    with XsConn(str(host.xsd.socket_path)) as xs:
        for node in nodes:
            xs.write(node, "1")
    await host.settle()

    ring = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    ring.connect(str(host.xsd.socket_path))
    try:
        frames = [
            wire.pack(Op.WATCH, wire.watch_payload(home.encode(), b"w%d" % i), i + 1)
            for i in range(WATCHES)
        ]
        frames += [
            wire.pack(Op.SET_PERMS, f"{node}\0n{a}\0r{s}\0".encode(), WATCHES + i + 1)
            for i, node in enumerate(nodes)
        ]
        threading.Thread(target=_send, args=(ring, b"".join(frames)), daemon=True).start()
        # Every grant is decided, and reset: the reset that fills the guest's queues too.
        await eventually(lambda: all(host.perms(n) == (f"n{a}",) for n in nodes), WAIT)

        # Another customer's grant is reset too: the daemon's vetoes are not wedged.
        grant = f"/local/domain/{b}/data/leak/ring-ref"
        with XsConn(str(host.xsd.socket_path)) as xs:
            xs.write(grant, "1")
            xs.set_perms(grant, (f"n{b}", f"r{s}"))
        await eventually(lambda: host.perms(grant) == (f"n{b}",), WAIT)
        out = host.last(f"xs-channel {grant}")
        assert not out.allowed and [c.domid for c in out.clients] == [s]

        # And a domain conflicting with running bank-a is still vetoed.
        rival = await host.call(host.ts.create, domcfg("web-b1"))
        await eventually(lambda: "web-b1" not in host.domains(), WAIT)
        out = host.last(f"domain {rival}")
        assert not out.allowed and out.decision.rule is Rule.CHINESE_WALL
    finally:
        ring.close()  # the guest goes: oxenstored drops its watches


@pytest_twisted.ensureDeferred
async def test_a_transaction_alone_runs_on_the_shared_connection_when_none_opens(
    xenstored: SandboxXenstored, monkeypatch: pytest.MonkeyPatch
) -> None:
    gateway = XenstoreGateway(GatewayConfig(socket_path=str(xenstored.socket_path)))
    await gateway.connect()
    try:

        def refused() -> None:
            raise ConnectionLost("cannot connect: too many open files")

        monkeypatch.setattr(gateway, "_open", refused)
        await gateway.transaction(lambda tx: tx.write("/veto/x", b"1"), alone=True)
        assert await gateway.read("/veto/x") == b"1"  # the veto ran all the same
    finally:
        await gateway.close()
