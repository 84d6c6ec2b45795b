"""A guest flooding the gateway's watch-event queue must cost a re-read of its own tree, not
of the whole store (red-team finding, robust; DESIGN.md §2 "Trust").

The queue between the reader thread and the reactor holds at most ``max_pending_events``
distinct events (`shyped.xenstore.events`). A guest writing distinct paths below its own
home (create and remove: its node quota never binds) faster than the reactor takes them
filled it; past the bound every event, anyone's, was dropped and the watch reported as
overflowed, and the daemon read the WHOLE store again (a reconcile of ``/``: 800,000 nodes
at 5,000 domains). The guest could make that happen again after every batch.

Now a guest's lane holds at most a share of the queue; what is dropped is charged to the lane
it came from, and that guest's tree (``/local/domain/<d>``) is read again at the next batch,
as when its backlog in the daemon overflows (`shyped.core.fairbatch`): no event is lost,
nobody else's tree is read. The reactor is held while the guest writes, so the whole flood
reaches the queue at once: deterministic.
"""

from __future__ import annotations

import pytest_twisted
from daemon_helpers import Harness, domcfg, host_fixture

from shyped.sandbox.xsconn import XsConn
from shyped.xenstore.events import EventQueue

__all__ = ["host_fixture"]  # the `host` fixture

#: The gateway queue for this test (the daemon's default is 10,000) and the guest's flood.
QUEUE = 400
FLOOD = 1200


@pytest_twisted.ensureDeferred
async def test_a_guest_overflowing_the_event_queue_has_only_its_tree_read_again(
    host: Harness,
) -> None:
    await host.start()
    daemon = host.daemon
    assert daemon is not None
    a = await host.call(host.ts.create, domcfg("web-a1"))  # bank-a: the flooding guest
    s = await host.call(host.ts.create, domcfg("shop-1"))  # no STE type shared with web-a1
    await host.settle()
    inbox = daemon.gateway._inbox
    inbox.events = EventQueue(QUEUE, max_per_lane=QUEUE // 4)
    reconciles, overflows = daemon._reconciles, daemon._pending.overflows
    grant = f"/local/domain/{a}/data/hidden/ring-ref"
    other = f"/local/domain/{s}/data/note"
    with XsConn(str(host.xsd.socket_path)) as xs:  # the reactor is held: one burst
        for i in range(FLOOD):
            xs.write(f"/local/domain/{a}/data/f{i}", "1")
            xs.rm(f"/local/domain/{a}/data/f{i}")
        xs.write(grant, "1")  # in the middle of the flood: its event is dropped
        xs.set_perms(grant, (f"n{a}", f"r{s}"))
        for i in range(FLOOD, FLOOD + 200):
            xs.write(f"/local/domain/{a}/data/f{i}", "1")
        xs.write(other, "1")  # another guest's event, past the flood
    await host.settle()

    assert inbox.events.stats().dropped > 0  # the flood did overflow the queue
    assert daemon._reconciles == reconciles  # the store was not read again whole
    assert daemon._pending.overflows > overflows  # the flooder's tree was
    # Nothing was missed: the grant hidden in the flood was decided and reset.
    out = host.last(f"xs-channel {grant}")
    assert not out.allowed and [c.domid for c in out.clients] == [s]
    assert host.perms(grant) == (f"n{a}",)


# -- the queue itself (pure) ------------------------------------------------------------------


def test_a_full_lane_drops_its_own_events_and_is_reported_not_the_watch() -> None:
    queue = EventQueue(100, max_per_lane=3)
    for i in range(5):
        queue.push(b"/local/domain/7/data/%d" % i, b"tok", (b"tok", b"7"))
    queue.push(b"/local/domain/8/x", b"tok", (b"tok", b"8"))  # another guest: room left
    batch = queue.take(100)
    assert len(batch.events) == 4 and (b"/local/domain/8/x", b"tok") in batch.events
    assert batch.overflowed_lanes == {(b"tok", b"7")} and batch.overflowed == frozenset()
    assert not queue.has_work() and queue.stats().dropped == 2


def test_a_full_queue_charges_each_drop_to_its_lane_or_else_to_its_watch() -> None:
    queue = EventQueue(2)
    queue.push(b"/a/1", b"tok", (b"tok", b"1"))
    queue.push(b"/a/2", b"tok", (b"tok", b"2"))
    queue.push(b"/a/3/x", b"tok", (b"tok", b"3"))  # full: lane 3 is re-read
    queue.push(b"/a", b"tok")  # no lane of its own: the watch is
    batch = queue.take(10)
    assert batch.overflowed_lanes == {(b"tok", b"3")} and batch.overflowed == {b"tok"}


def test_dom0s_lane_is_not_capped() -> None:
    queue = EventQueue(100, max_per_lane=2)
    for i in range(5):
        queue.push(b"/local/domain/0/backend/%d" % i, b"tok", (b"tok", b"0"), capped=False)
    assert len(queue.take(100).events) == 5
