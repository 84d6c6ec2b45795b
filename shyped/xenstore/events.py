"""A bounded, de-duplicating queue of watch events between the reader thread and the reactor.

Why: a guest may write its own nodes thousands of times a second and the daemon watches the
trees those nodes live in.  A watch event carries no value, only "this path changed": whoever
handles it reads the node's current state.  So two pending events for the same (path, token)
are one event, and the queue keeps the first (its position, so a hot path cannot push other
paths back) and drops the repeat.  Distinct pending events are capped at ``max_pending``,
and those of one lane (below) at ``max_per_lane``; past that, new events are dropped and
reported as *overflowed*: the lane they belong to (`EventBatch.overflowed_lanes`) when they
were queued in a lane of their own, else their watch token. That tells the daemon that this
lane's (or watch's) events are incomplete and it must re-read that subtree: one guest's
home, not the whole watched tree, when a guest floods.  Memory is therefore bounded by
``max_pending`` keys (and `MAX_OVERFLOWED_LANES` lanes) whatever the write rate, and nothing
is lost silently.

Fairness: events wait in *lanes* and ``take`` serves the lanes round-robin, one event per lane
per round.  The gateway makes a lane of each watch token plus the first path component below
the watched path (the domid under ``/local/domain``), so a guest with a thousand distinct
nodes pending delays another guest's event by one event per busy lane, not by its backlog.

Pure and not thread-safe: the gateway holds a lock around every call.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable

import attrs

#: (path, token) exactly as xenstored sent them.
RawEvent = tuple[bytes, bytes]

#: Lanes remembered as overflowed until the next ``take``; past that the watch token is.
MAX_OVERFLOWED_LANES = 4096


@attrs.frozen
class EventBatch:
    """What the reactor receives at once: events in arrival order, and overflowed tokens."""

    events: tuple[RawEvent, ...]
    overflowed: frozenset[bytes]
    #: lanes (as given to ``push``) some of whose events were dropped
    overflowed_lanes: frozenset[Hashable] = frozenset()

    def __bool__(self) -> bool:
        return bool(self.events or self.overflowed or self.overflowed_lanes)


@attrs.frozen
class EventQueueStats:
    """Counters since the queue was made (for metrics)."""

    received: int
    coalesced: int
    dropped: int
    overflows: int
    pending: int
    high_water: int


class EventQueue:
    """Bounded FIFO of distinct (path, token) events; see the module docstring."""

    def __init__(self, max_pending: int, max_per_lane: int | None = None) -> None:
        if max_pending < 1 or (max_per_lane is not None and max_per_lane < 1):
            raise ValueError("max_pending and max_per_lane must be at least 1")
        self.max_pending = max_pending
        self.max_per_lane = max_pending if max_per_lane is None else max_per_lane
        self._overflowed_lanes: set[Hashable] = set()
        #: every pending event → its lane (the de-duplication index)
        self._pending: dict[RawEvent, Hashable] = {}
        #: lanes in service order, each a FIFO of its events
        self._lanes: OrderedDict[Hashable, OrderedDict[RawEvent, None]] = OrderedDict()
        self._overflowed: set[bytes] = set()
        self._received = 0
        self._coalesced = 0
        self._dropped = 0
        self._overflows = 0
        self._high_water = 0

    def __len__(self) -> int:
        return len(self._pending)

    def has_work(self) -> bool:
        """True if a ``take`` would return something."""
        return bool(self._pending or self._overflowed or self._overflowed_lanes)

    def push(self, path: bytes, token: bytes, lane: Hashable = None, capped: bool = True) -> None:
        """Queue one event: coalesced if already pending, dropped (lane or token flagged) if
        full.

        ``lane`` groups events for round-robin service (default: the token); a lane given
        here holds at most ``max_per_lane`` events unless ``capped`` is False (a lane only
        dom0 writes in).
        """
        self._received += 1
        key = (path, token)
        if key in self._pending:
            self._coalesced += 1
            return
        own_lane = lane is not None
        if lane is None:
            lane = token
        queue = self._lanes.get(lane)
        if len(self._pending) >= self.max_pending or (
            own_lane and capped and queue is not None and len(queue) >= self.max_per_lane
        ):
            self._drop(token, lane if own_lane else None)
            return
        self._pending[key] = lane
        if queue is None:
            queue = self._lanes[lane] = OrderedDict()
        queue[key] = None
        if len(self._pending) > self._high_water:
            self._high_water = len(self._pending)

    def _drop(self, token: bytes, lane: Hashable | None) -> None:
        """An event dropped: its lane is re-read (or, without one, its whole watch)."""
        self._dropped += 1
        if lane is not None and (
            lane in self._overflowed_lanes or len(self._overflowed_lanes) < MAX_OVERFLOWED_LANES
        ):
            if lane not in self._overflowed_lanes:
                self._overflowed_lanes.add(lane)
                self._overflows += 1
        elif token not in self._overflowed:
            self._overflowed.add(token)
            self._overflows += 1

    def take(self, limit: int) -> EventBatch:
        """Remove and return up to ``limit`` events, lanes served round-robin (each lane in
        arrival order), and every overflowed token."""
        events: list[RawEvent] = []
        lanes = self._lanes
        pending = self._pending
        while lanes and len(events) < limit:
            for lane in list(lanes):
                queue = lanes[lane]
                key = queue.popitem(last=False)[0]
                del pending[key]
                events.append(key)
                if queue:
                    lanes.move_to_end(lane)  # served: to the back of the line
                else:
                    del lanes[lane]
                if len(events) >= limit:
                    break
        overflowed = frozenset(self._overflowed)
        self._overflowed.clear()
        lanes_over = frozenset(self._overflowed_lanes)
        self._overflowed_lanes.clear()
        return EventBatch(tuple(events), overflowed, lanes_over)

    def discard_token(self, token: bytes) -> None:
        """Forget pending events of a watch that was removed."""
        for key in [k for k in self._pending if k[1] == token]:
            lane = self._pending.pop(key)
            queue = self._lanes[lane]
            del queue[key]
            if not queue:
                del self._lanes[lane]
        self._overflowed.discard(token)
        self._overflowed_lanes = {
            lane
            for lane in self._overflowed_lanes
            if not (isinstance(lane, tuple) and lane and lane[0] == token)
        }

    def stats(self) -> EventQueueStats:
        return EventQueueStats(
            received=self._received,
            coalesced=self._coalesced,
            dropped=self._dropped,
            overflows=self._overflows,
            pending=len(self._pending),
            high_water=self._high_water,
        )
