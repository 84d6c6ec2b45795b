"""How many of the daemon's label writes may have watch events not delivered yet.

Why: oxenstored 4.17 (``tools/ocaml/xenstored``, since XSA-326) holds the watch events a
request fires in a pipe of the *writer's* connection while the watcher's queues are full
(the watcher's output and the watch's own pipe, ``quota-maxwatchevents`` = 1,024 each), and
flushes that pipe only when it processes the writer again: when the writer sends another
request or has a reply to send. A toolstack that commits a domain's creation and then only
waits (for the label, on another connection) has its events held for ever.

Every label the daemon writes fires four events on its own ``/local/domain`` watch (the
directory and the label, each made and given permissions). Written all at once, as at a cold
start over 1,000 domains (4,000 events), they fill the daemon's own queues for a while; a
domain created in that while was never decided: its creation's events sat in the
toolstack's connection (``benchmarks/bench_daemon_scale.py`` hung so, see
tests/test_label_window.py). So at most `WINDOW` label writes may be out with their events
not yet seen by the daemon (`seen`, from the event path; `SEEN_WAIT` at most each, should an
event never come): the daemon's own events take at most a quarter of its queues, and the
rest stays free for everyone else's.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred

#: Label writes whose events the daemon has not seen yet (4 events each: 512 of 2,048).
WINDOW = 128
#: Seconds a write holds its place without its event (then the place is given up).
SEEN_WAIT = 2.0


class LabelWindow:
    """Places for label writes (see the module docstring); reactor thread only."""

    def __init__(self, reactor: Any, size: int = WINDOW, seen_wait: float = SEEN_WAIT) -> None:
        if size < 1:
            raise ValueError("size must be at least 1")
        self.reactor = reactor
        self.size = size
        self.seen_wait = seen_wait
        #: label path -> the timer that gives its place up; oldest first
        self._out: OrderedDict[str, Any] = OrderedDict()
        self._waiting: deque[Deferred[None]] = deque()
        self._going = 0  # places given to writes not written (nor released) yet
        #: places given up without the event (status, tests)
        self.timeouts = 0
        #: the most places out at once (tests)
        self.high_water = 0

    def __len__(self) -> int:
        """Places taken: writes going out, and written ones whose event is not seen yet."""
        return self._going + len(self._out)

    def place(self) -> Deferred[None]:
        """Fires once a label write may go out (at once while fewer than `size` places are
        taken); the place is the caller's until `written` or `released`."""
        d: Deferred[None] = Deferred()
        self._waiting.append(d)
        self._next()
        return d

    async def write(self, path: str, write: Callable[[], Deferred[bool]]) -> bool:
        """`write()` (the label at `path`; True if written) once a place is free, holding
        the place until its event is seen if it wrote."""
        await self.place()
        try:
            written = await write()
        except BaseException:
            self.released()
            raise
        if written:
            self.written(path)
        else:
            self.released()
        return written

    def written(self, path: str) -> None:
        """The label at `path` was written: its place is held until its event is `seen`."""
        self._going -= 1
        old = self._out.pop(path, None)
        if old is not None and old.active():
            old.cancel()  # the same path twice holds one place
        self._out[path] = self.reactor.callLater(self.seen_wait, self._expire, path)
        self.high_water = max(self.high_water, len(self))
        self._next()

    def released(self) -> None:
        """A write that took a place wrote nothing (it failed, or its domain was gone)."""
        self._going -= 1
        self._next()

    def seen(self, path: str) -> None:
        """A watch event for `path` reached the daemon."""
        timer = self._out.pop(path, None)
        if timer is None:
            return
        if timer.active():
            timer.cancel()
        self._next()

    def close(self) -> None:
        """The daemon stops: no place is held any more, every waiting write goes (to be
        abandoned, `shyped.service.enforcer.Stopping`)."""
        for timer in self._out.values():
            if timer.active():
                timer.cancel()
        self._out.clear()
        self.size = max(self.size, len(self._waiting) + self._going + 1)
        self._next()

    def _expire(self, path: str) -> None:
        if self._out.pop(path, None) is not None:
            self.timeouts += 1
            self._next()

    def _next(self) -> None:
        while self._waiting and len(self) < self.size:
            self._going += 1
            self._waiting.popleft().callback(None)
