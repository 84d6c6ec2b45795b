"""A bounded, de-duplicating queue of watch events between the reader thread and the reactor.

Why: a guest may write its own nodes thousands of times a second and the daemon watches the
trees those nodes live in.  A watch event carries no value, only "this path changed": whoever
handles it reads the node's current state.  So two pending events for the same (path, token)
are one event, and the queue keeps the first (its position, so a hot path cannot push other
paths back) and drops the repeat.  Distinct pending events are capped at ``max_pending``;
past that, new events are dropped and their watch token is reported as *overflowed*, which
tells the daemon that this watch's events are incomplete and it must re-read (reconcile) the
watched subtree.  Memory is therefore bounded by ``max_pending`` keys whatever the write rate,
and nothing is lost silently.

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


@attrs.frozen
class EventBatch:
    """What the reactor receives at once: events in arrival order, and overflowed tokens."""

    events: tuple[RawEvent, ...]
    overflowed: frozenset[bytes]

    def __bool__(self) -> bool:
        return bool(self.events or self.overflowed)


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

    def __init__(self, max_pending: int) -> None:
        if max_pending < 1:
            raise ValueError("max_pending must be at least 1")
        self.max_pending = max_pending
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
        return bool(self._pending or self._overflowed)

    def push(self, path: bytes, token: bytes, lane: Hashable = None) -> None:
        """Queue one event: coalesced if already pending, dropped (token flagged) if full.

        ``lane`` groups events for round-robin service (default: the token).
        """
        self._received += 1
        key = (path, token)
        if key in self._pending:
            self._coalesced += 1
            return
        if len(self._pending) >= self.max_pending:
            self._dropped += 1
            if token not in self._overflowed:
                self._overflowed.add(token)
                self._overflows += 1
            return
        if lane is None:
            lane = token
        self._pending[key] = lane
        queue = self._lanes.get(lane)
        if queue is None:
            queue = self._lanes[lane] = OrderedDict()
        queue[key] = None
        if len(self._pending) > self._high_water:
            self._high_water = len(self._pending)

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
        return EventBatch(tuple(events), overflowed)

    def discard_token(self, token: bytes) -> None:
        """Forget pending events of a watch that was removed."""
        for key in [k for k in self._pending if k[1] == token]:
            lane = self._pending.pop(key)
            queue = self._lanes[lane]
            del queue[key]
            if not queue:
                del self._lanes[lane]
        self._overflowed.discard(token)

    def stats(self) -> EventQueueStats:
        return EventQueueStats(
            received=self._received,
            coalesced=self._coalesced,
            dropped=self._dropped,
            overflows=self._overflows,
            pending=len(self._pending),
            high_water=self._high_water,
        )
