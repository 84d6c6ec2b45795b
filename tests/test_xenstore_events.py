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
