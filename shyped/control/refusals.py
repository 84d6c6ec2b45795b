"""What refused peers may make the daemon write, bounded: one full entry, then a count. Pure.

A refusal (an op the peer may not ask for, a connection over its class's slots, a request line
not finished in time) is logged -- and, for change requests, audited -- in full the first time
a uid is refused in an interval. Further refusals of that uid in the same interval are only
counted; at the end of the interval each uid with counted refusals gets one summary (a log line
and a ``control-refusals`` audit record with the count per kind). So a uid flooding refused
requests adds at most two audit records per interval, whatever its rate, and cannot rotate
decision records out of the audit trail. At most `max_uids` uids are tracked per interval;
refusals of further uids are counted together under uid -1.
"""

from __future__ import annotations

from typing import Final

import attrs

from shyped.core.repeats import RepeatLog

#: The uid under which refusals beyond `RefusalLog.max_uids` distinct uids are counted.
OVERFLOW_UID: Final = -1


@attrs.frozen
class RefusalSummary:
    """Refusals of one uid in one interval, beyond the first (which was written in full)."""

    uid: int
    gid: int
    count: int
    #: (kind, count) pairs, most frequent first; a kind is an op name, ``connect``, ``timeout``.
    kinds: tuple[tuple[str, int], ...]

    def describe(self, interval: float) -> str:
        what = ", ".join(f"{kind} x{n}" for kind, n in self.kinds)
        who = "other uids" if self.uid == OVERFLOW_UID else f"uid {self.uid}"
        return f"{self.count} more refused request(s) from {who} in {interval:g} s ({what})"


@attrs.define
class RefusalLog:
    """Counts refusals per uid for the current interval (see module docstring)."""

    max_uids: int = 64
    _log: RepeatLog[tuple[int, int]] = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self._log = RepeatLog((OVERFLOW_UID, OVERFLOW_UID), max_keys=self.max_uids)

    def note(self, uid: int, gid: int, kind: str) -> bool:
        """Count a refusal; True when it is the uid's first this interval (write it in full)."""
        return self._log.note((uid, gid), kind)

    def flush(self) -> list[RefusalSummary]:
        """The summaries of the interval that ends now (uids with counted refusals only)."""
        return [
            RefusalSummary(uid=r.key[0], gid=r.key[1], count=r.count, kinds=r.kinds)
            for r in sorted(self._log.flush(), key=lambda r: r.key)
        ]
