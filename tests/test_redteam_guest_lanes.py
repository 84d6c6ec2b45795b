"""Two guests flooding the gateway's event queue together must still cost only their own
trees, never a read of the whole store (red-team finding, redguest; DESIGN.md §2 "Trust").

The queue between the reader thread and the reactor (`shyped.xenstore.events`) holds at
most ``max_pending_events`` distinct events, and one lane (a guest's home) at most half of
them (`shyped.xenstore.router`). One guest filling its lane has only its own tree read again
(tests/test_daemon_guest_queue_flood.py). But two guests (one customer's two domains, or any
two hostile guests) fill both halves: the queue is full and every other event is dropped.
A dropped event of a trusted tree (``/libxl/<d>``, ``/vm/<uuid>``) or of a laneless watch
(``@introduceDomain``) overflowed its watch, and the daemon read the WHOLE store again (800,000
nodes at 5,000 domains) each time the toolstack did anything while the flood went on.

Each guest writes only below its own ``data/`` (which it owns on real Xen), creating and
removing distinct nodes (its node quota never binds). The reactor is held while the guests
write and the toolstack creates a domain, so the whole flood reaches the queue at once.
"""

from __future__ import annotations

import pytest_twisted
from daemon_helpers import Harness, domcfg, host_fixture
from twisted.internet import reactor

from shyped.policy.decisions import Rule
from shyped.sandbox.xsconn import XsConn
from shyped.xenstore.events import EventQueue
from shyped.xenstore.router import _Inbox

__all__ = ["host_fixture"]  # the `host` fixture

#: The gateway queue for this test (the daemon's default is 10,000) and each guest's flood
#: (more than a lane holds).
QUEUE = 400
FLOOD = 600


@pytest_twisted.ensureDeferred
async def test_two_guests_filling_the_event_queue_do_not_make_the_daemon_read_the_whole_store(
    host: Harness,
) -> None:
    await host.start()
    daemon = host.daemon
    assert daemon is not None
    a = await host.call(host.ts.create, domcfg("web-a1"))  # bank-a: hostile
    b = await host.call(host.ts.create, domcfg("batch-a1"))  # bank-a: hostile too
    s = await host.call(host.ts.create, domcfg("shop-1"))
    await host.settle()
    inbox = daemon.gateway._inbox
    inbox.events = _Inbox(reactor, inbox._drain, QUEUE).events  # as the gateway makes it
    reconciles = daemon._reconciles
    grant = f"/local/domain/{a}/data/hidden/ring-ref"
    with XsConn(str(host.xsd.socket_path)) as xs:  # the reactor is held: one burst
        for i in range(FLOOD):
            for d in (a, b):
                xs.write(f"/local/domain/{d}/data/f{i}", "1")
                xs.rm(f"/local/domain/{d}/data/f{i}")
        xs.write(grant, "1")  # in the flood: its event is dropped
        xs.set_perms(grant, (f"n{a}", f"r{s}"))
    rival = host.ts.create(domcfg("web-b1"))  # the toolstack, while the queue is full
    await host.settle()

    assert inbox.events.stats().dropped > 0  # the flood did fill the queue
    assert daemon._reconciles == reconciles  # the store was not read again whole
    # Nothing was missed: the grant hidden in the flood was decided and reset, and the
    # rival created while the queue was full was decided (it conflicts with bank-a).
    out = host.last(f"xs-channel {grant}")
    assert not out.allowed and [c.domid for c in out.clients] == [s]
    assert host.perms(grant) == (f"n{a}",)
    out = host.last(f"domain {rival}")
    assert not out.allowed and out.decision.rule is Rule.CHINESE_WALL
    assert "web-b1" not in host.domains()


def test_guest_lanes_together_leave_room_for_dom0s_events() -> None:
    queue = EventQueue(8, max_per_lane=4, max_capped=6)
    for d in (b"5", b"6"):
        for i in range(4):
            queue.push(b"/local/domain/%s/data/%d" % (d, i), b"tok", (b"tok", d))
    queue.push(b"/libxl/7/x", b"lib", (b"lib", b"7"), capped=False)  # dom0's: room left
    queue.push(b"@introduceDomain", b"intro")
    batch = queue.take(100)
    assert (b"/libxl/7/x", b"lib") in batch.events and (
        b"@introduceDomain",
        b"intro",
    ) in batch.events
    assert batch.overflowed == frozenset()  # no watch overflowed whole
    assert batch.overflowed_lanes == {(b"tok", b"6")}  # the second guest's lane is read again
    assert len(batch.events) == 8
    # taken: the guests' share is free again
    queue.push(b"/local/domain/6/data/9", b"tok", (b"tok", b"6"))
    assert len(queue.take(100).events) == 1
