"""Which watched paths the daemon reads in its next batch: fair per guest domain (pure).

A guest may write thousands of nodes a second in its own tree, and every path it touches costs
the daemon a read (and a ``get_perms``) before any decision of the same batch. Read all of them
at once and one guest's write rate delays everybody's decisions (DESIGN.md §2, "Trust"). So
each batch takes:

* every pending **trusted** path first: ``/vm``, ``/libxl``, ``@introduceDomain`` /
  ``@releaseDomain``, dom0's tree ``/local/domain/0`` (dom0's backends), and the nodes libxl
  writes for a domain that the guest itself cannot (``/local/domain/<d>`` and its ``vm``,
  ``name``, ``domid``);
* then, per guest domain (the ``<d>`` of ``/local/domain/<d>/…``), at most `per_domain` of its
  pending paths, oldest first, and at most `per_batch` guest paths in all, the domains taken
  in turn (round robin: a domain that still has some left goes to the back of the line).

The rest waits for the next batch, keeping the time its first event arrived; a path that fires
again while it waits keeps its place (it will be read once, with its newest value). Every batch
takes something from every waiting domain until `per_batch` runs out, and the line turns, so
nothing waits forever: a domain waits at most ``ceil(domains * per_domain / per_batch)``
batches for its turn. The daemon's ``settled()`` barrier waits until nothing is pending at
all, deferred paths included.

A guest that writes faster than its budget drains would grow its backlog without bound: past
`max_waiting` paths its backlog is dropped and replaced by one mark, "read this guest's tree
again" (`take_overflowed`, at the next batch): a snapshot of ``/local/domain/<d>`` taken after
the drop shows every change the dropped paths stood for (fail closed: nothing is ignored).
"""

from __future__ import annotations

import re

import attrs

#: Paths per guest domain one batch reads (its flood waits for later batches).
PER_DOMAIN = 128
#: Guest paths one batch reads in all (trusted paths are not counted).
PER_BATCH = 2048
#: Paths one guest may have waiting; past it they are forgotten and its whole tree is read
#: again instead (`FairBatches.take_overflowed`): memory stays bounded, nothing is missed.
MAX_WAITING = 10_000

_GUEST = re.compile(r"/local/domain/([0-9]{1,10})(?:/([^/]*))?")
#: Nodes libxl writes below ``/local/domain/<d>`` that the guest may read but not write.
_LIBXL_KEYS = frozenset({"vm", "name", "domid"})


def guest_of(path: str) -> int | None:
    """The guest domain whose pending paths `path` counts against, or None if trusted."""
    m = _GUEST.match(path)
    if m is None:
        return None
    domid = int(m.group(1))
    rest = path[m.end() :]
    if domid == 0 or (rest == "" and (m.group(2) is None or m.group(2) in _LIBXL_KEYS)):
        return None
    return domid


@attrs.define
class FairBatches:
    """Pending watched paths, taken batch by batch (see the module docstring)."""

    per_domain: int = PER_DOMAIN
    per_batch: int = PER_BATCH
    max_waiting: int = MAX_WAITING
    #: path -> time its first pending event arrived
    _trusted: dict[str, float] = attrs.field(factory=dict, init=False)
    #: domid -> (path -> time), domains in turn order (the next batch starts at the front)
    _guests: dict[int, dict[str, float]] = attrs.field(factory=dict, init=False)
    #: what the current batch has taken per domain (`begin` resets it)
    _spent: dict[int, int] = attrs.field(factory=dict, init=False)
    #: guests whose backlog overflowed -> earliest time of what was dropped
    _overflowed: dict[int, float] = attrs.field(factory=dict, init=False)
    #: times a guest's backlog overflowed (status, tests)
    overflows: int = attrs.field(default=0, init=False)

    def __attrs_post_init__(self) -> None:
        if self.per_domain < 1 or self.per_batch < 1 or self.max_waiting < 1:
            raise ValueError("per_domain, per_batch and max_waiting must be at least 1")

    def __len__(self) -> int:
        guests = sum(len(p) for p in self._guests.values())
        return len(self._trusted) + guests + len(self._overflowed)

    def __bool__(self) -> bool:
        return bool(self._trusted or self._guests or self._overflowed)

    def __contains__(self, path: object) -> bool:
        if not isinstance(path, str):
            return False
        domid = guest_of(path)
        if domid is None:
            return path in self._trusted
        return path in self._guests.get(domid, {})

    def add(self, path: str, now: float) -> None:
        """A watch event for `path` at `now` (kept: the earliest time while it waits)."""
        domid = guest_of(path)
        if domid is None:
            self._trusted.setdefault(path, now)
        elif domid in self._overflowed:
            pass  # its whole tree is read again at the next batch
        else:
            paths = self._guests.setdefault(domid, {})
            paths.setdefault(path, now)
            if len(paths) > self.max_waiting:
                del self._guests[domid]
                self._overflowed[domid] = min(paths.values())
                self.overflows += 1

    def drop_guest(self, domid: int, now: float) -> None:
        """Events of guest `domid` were dropped before they reached the daemon (the gateway's
        queue overflowed in its lane): its whole tree is read again at the next batch, as
        when its backlog here overflows; what it has pending is part of that re-read."""
        paths = self._guests.pop(domid, {})
        earliest = min([now, *paths.values()])
        if domid in self._overflowed:
            self._overflowed[domid] = min(self._overflowed[domid], earliest)
        else:
            self._overflowed[domid] = earliest
            self.overflows += 1

    def take_overflowed(self) -> dict[int, float]:
        """Guests whose tree must be read again whole (their backlog overflowed), with the
        earliest time of what was dropped. Taken once: events after this queue again."""
        taken, self._overflowed = self._overflowed, {}
        return taken

    def waiting(self, domid: int) -> int:
        """Paths of guest `domid` still pending (`max_waiting` + 1 once it overflowed)."""
        if domid in self._overflowed:
            return self.max_waiting + 1
        return len(self._guests.get(domid, {}))

    def begin(self) -> None:
        """A new batch: every domain's budget is whole again."""
        self._spent = {}

    def take(self) -> tuple[list[str], float | None]:
        """The paths to read now (trusted ones first) within what is left of this batch's
        budgets, and the earliest time any of them arrived (None if there are none)."""
        taken: dict[str, float] = self._trusted
        self._trusted = {}
        room = self.per_batch - sum(self._spent.values())
        done: list[int] = []
        later: list[int] = []
        for domid, paths in self._guests.items():
            n = min(self.per_domain - self._spent.get(domid, 0), room, len(paths))
            if n <= 0:
                if room <= 0:
                    break
                continue
            room -= n
            self._spent[domid] = self._spent.get(domid, 0) + n
            for path in list(paths)[:n]:
                taken[path] = paths.pop(path)
            (later if paths else done).append(domid)
        for domid in done:
            del self._guests[domid]
        for domid in later:  # served: to the back of the line
            self._guests[domid] = self._guests.pop(domid)
        earliest = min(taken.values()) if taken else None
        return list(taken), earliest
