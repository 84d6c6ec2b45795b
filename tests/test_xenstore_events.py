"""The bounded, coalescing watch-event queue (shyped.xenstore.events)."""

from __future__ import annotations

import pytest

from shyped.xenstore.events import EventQueue


def test_repeats_of_a_pending_event_coalesce_in_first_position() -> None:
    q = EventQueue(max_pending=10)
    for path in (b"/a", b"/b", b"/a", b"/a", b"/c", b"/b"):
        q.push(path, b"t")
    batch = q.take(100)
    assert batch.events == ((b"/a", b"t"), (b"/b", b"t"), (b"/c", b"t"))
    assert not batch.overflowed
    stats = q.stats()
    assert (stats.received, stats.coalesced, stats.dropped, stats.pending) == (6, 3, 0, 0)
    q.push(b"/a", b"t")  # delivered events are new again
    assert q.take(100).events == ((b"/a", b"t"),)


def test_same_path_under_two_tokens_is_two_events() -> None:
    q = EventQueue(max_pending=10)
    q.push(b"/a", b"t1")
    q.push(b"/a", b"t2")
    assert len(q) == 2


def test_full_queue_drops_new_events_and_flags_their_watch_once() -> None:
    q = EventQueue(max_pending=3)
    for i in range(3):
        q.push(b"/g/%d" % i, b"guest")
    for i in range(3, 1000):
        q.push(b"/g/%d" % i, b"guest")
    q.push(b"/g/0", b"guest")  # still coalesces while full
    q.push(b"/other", b"dom0")
    stats = q.stats()
    assert stats.pending == 3 and stats.high_water == 3
    assert stats.dropped == 998 and stats.overflows == 2 and stats.coalesced == 1
    batch = q.take(2)
    assert batch.events == ((b"/g/0", b"guest"), (b"/g/1", b"guest"))
    assert batch.overflowed == frozenset({b"guest", b"dom0"})
    assert q.has_work()
    rest = q.take(2)
    assert rest.events == ((b"/g/2", b"guest"),) and not rest.overflowed
    assert not q.has_work() and not q.take(5)


def test_discarding_a_token_forgets_its_events() -> None:
    q = EventQueue(max_pending=2)
    q.push(b"/a", b"gone")
    q.push(b"/b", b"kept")
    q.push(b"/c", b"gone")  # overflow
    q.discard_token(b"gone")
    batch = q.take(10)
    assert batch.events == ((b"/b", b"kept"),) and not batch.overflowed


def test_bound_must_be_positive() -> None:
    with pytest.raises(ValueError):
        EventQueue(0)


def test_lanes_are_served_round_robin_so_a_busy_guest_cannot_starve_a_quiet_one() -> None:
    q = EventQueue(max_pending=1000)
    for i in range(500):
        q.push(b"/local/domain/5/data/%d" % i, b"doms", lane=b"5")
    q.push(b"/local/domain/6/device/vif/0/state", b"doms", lane=b"6")
    q.push(b"/local/domain/7/name", b"doms", lane=b"7")
    first = q.take(3).events
    assert [p.split(b"/")[3] for p, _ in first] == [b"5", b"6", b"7"]
    rest = q.take(1000).events
    assert len(rest) == 499 and rest[0][0] == b"/local/domain/5/data/1"  # lane keeps its order
    assert len(q) == 0


def test_a_partial_round_resumes_with_the_lanes_not_yet_served() -> None:
    q = EventQueue(max_pending=100)
    for lane in (b"a", b"b", b"c"):
        for i in range(2):
            q.push(lane + b"/%d" % i, b"t", lane=lane)
    assert [p for p, _ in q.take(2).events] == [b"a/0", b"b/0"]
    assert [p for p, _ in q.take(4).events] == [b"c/0", b"a/1", b"b/1", b"c/1"]
