"""Bounding what a repeated event makes the daemon write: the first few in full, then a count.

Anything an outsider controls the rate of — a local uid's refused control requests, a guest's
grants and rendezvous in its own xenstore subtree — must not be able to fill the log or rotate
the audit trail's older records away. `RepeatLog` counts occurrences per key in the current
interval: the first `burst` of a key are written in full, the rest only counted, and at the
end of the interval each key with counted occurrences gets one summary. At most `max_keys`
keys are tracked per interval; occurrences of further keys are counted together under
`overflow`. Pure: the caller owns the clock and calls `flush` at each interval's end.
"""

from __future__ import annotations

from collections import Counter
from typing import Generic, TypeVar

import attrs

K = TypeVar("K")


@attrs.frozen
class Repeats(Generic[K]):
    """Occurrences of one key in one interval beyond those written in full."""

    key: K
    count: int
    #: (kind, count) pairs, most frequent first (at most eight).
    kinds: tuple[tuple[str, int], ...]

    def kinds_text(self) -> str:
        return ", ".join(f"{kind} x{n}" for kind, n in self.kinds)


@attrs.define
class RepeatLog(Generic[K]):
    """Counts occurrences per key for the current interval (see module docstring)."""

    overflow: K
    burst: int = 1
    max_keys: int = 64
    _written: Counter[K] = attrs.field(factory=Counter, init=False)
    _counted: dict[K, Counter[str]] = attrs.field(factory=dict, init=False)

    def note(self, key: K, kind: str) -> bool:
        """Count an occurrence; True when it is to be written in full."""
        if key not in self._written and len(self._written) >= self.max_keys:
            key = self.overflow
        elif self._written[key] < self.burst:
            self._written[key] += 1
            return True
        self._counted.setdefault(key, Counter())[kind] += 1
        return False

    def flush(self) -> list[Repeats[K]]:
        """The summaries of the interval that ends now (keys with counted occurrences only)."""
        out = [
            Repeats(key, sum(kinds.values()), tuple(kinds.most_common(8)))
            for key, kinds in self._counted.items()
        ]
        self._written.clear()
        self._counted.clear()
        return out


PairKey = tuple[int, str, str, tuple[int, ...]]


@attrs.define
class PacedDecisions:
    """Which guest-paced decisions (grants and rendezvous a guest makes in its own subtree)
    are written in full, and which only counted, in the current interval.

    Written in full: the first decision of each (guest, kind, verdict, peers) in the
    interval — so every pair of domains a guest communicates with, or tried to, is named in
    the trail whatever else the guest did (at most `new_pairs` new pairs per guest and
    interval) — and then up to `burst` more per guest. The rest is counted per guest
    (`flush`), so a guest re-creating nodes cannot fill the log or rotate records away, nor
    hide a new permitted channel behind a burst of junk.
    """

    burst: int = 20
    new_pairs: int = 64
    max_guests: int = 4096
    _log: RepeatLog[int] = attrs.field(init=False)
    _pairs: set[PairKey] = attrs.field(factory=set, init=False)
    _new: Counter[int] = attrs.field(factory=Counter, init=False)

    def __attrs_post_init__(self) -> None:
        self._log = RepeatLog(-1, burst=self.burst, max_keys=self.max_guests)

    def note(self, guest: int, kind: str, verdict: str, peers: tuple[int, ...], what: str) -> bool:
        """Count a decision; True when it is to be written in full."""
        pair = (guest, kind, verdict, peers)
        if pair not in self._pairs and self._new[guest] < self.new_pairs:
            self._pairs.add(pair)
            self._new[guest] += 1
            return True
        return self._log.note(guest, what)

    def flush(self) -> list[Repeats[int]]:
        """Per guest, the decisions of the interval that ends now not written in full."""
        self._pairs.clear()
        self._new.clear()
        return self._log.flush()
