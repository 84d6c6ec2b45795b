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

Pure and not thread-safe: the gateway holds a lock around every call.
"""

from __future__ import annotations

from collections import OrderedDict

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
        self._pending: OrderedDict[RawEvent, None] = OrderedDict()
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

    def push(self, path: bytes, token: bytes) -> None:
        """Queue one event: coalesced if already pending, dropped (token flagged) if full."""
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
        self._pending[key] = None
        self._high_water = max(self._high_water, len(self._pending))

    def take(self, limit: int) -> EventBatch:
        """Remove and return up to ``limit`` oldest events and every overflowed token."""
        pending = self._pending
        if len(pending) <= limit:
            events = tuple(pending)
            pending.clear()
        else:
            events = tuple(pending.popitem(last=False)[0] for _ in range(limit))
        overflowed = frozenset(self._overflowed)
        self._overflowed.clear()
        return EventBatch(events, overflowed)

    def discard_token(self, token: bytes) -> None:
        """Forget pending events of a watch that was removed."""
        for key in [k for k in self._pending if k[1] == token]:
            del self._pending[key]
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
