"""``shypectl audit search``: the audit trail queried as ``ausearch`` queries the Linux audit log.

Pure: time expressions (`parse_time`), the filter (`Query.matches`) and the selection over
records (`select`); `shyped.cli.auditcli` reads the files. The log is only read, never written
or rewritten, so a search cannot break the chain (``audit verify`` checks it).

Time expressions (``--start`` / ``--end``, one or two words, as ausearch's ``-ts``/``-te``):
``now``, ``recent`` (10 minutes ago), ``this-hour``, ``boot``, ``today``, ``yesterday``,
``this-week`` (Monday), ``week-ago``, ``this-month``, ``this-year``; a date ``YYYY-MM-DD``, a time
``HH:MM[:SS]`` (today), both (``2026-12-07 10:00`` or ``2026-12-07T10:00:00``), optionally with
``Z`` or ``+HH:MM``. Without a zone it is local time, as in ausearch. A date without a time is
its midnight for ``--start`` and the end of that day for ``--end``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from datetime import date, datetime, time, timedelta, tzinfo
from typing import Final

import attrs

from shyped.core.audit import Record

KEYWORDS: Final = (
    "now",
    "recent",
    "this-hour",
    "boot",
    "today",
    "yesterday",
    "this-week",
    "week-ago",
    "this-month",
    "this-year",
)
DECISIONS: Final = ("permit", "deny")

_DATE: Final = re.compile(r"\d{4}-\d{2}-\d{2}")
_TIME: Final = re.compile(r"\d{1,2}:\d{2}(?::\d{2}(?:\.\d{1,6})?)?")
_ZONE: Final = re.compile(r"(Z|[+-]\d{2}:?\d{2})\Z")


class QueryError(ValueError):
    """A time expression or filter that cannot be read (the message says what is accepted)."""


def _midnight(day: date, tz: tzinfo | None) -> datetime:
    return datetime.combine(day, time(), tz)


def _keyword(word: str, now: datetime, boot: datetime | None) -> datetime:
    tz = now.tzinfo
    today = now.date()
    if word == "now":
        return now
    if word == "recent":
        return now - timedelta(minutes=10)
    if word == "this-hour":
        return now.replace(minute=0, second=0, microsecond=0)
    if word == "boot":
        if boot is None:
            raise QueryError("'boot': the boot time is not known here")
        return boot
    if word == "today":
        return _midnight(today, tz)
    if word == "yesterday":
        return _midnight(today - timedelta(days=1), tz)
    if word == "this-week":
        return _midnight(today - timedelta(days=today.weekday()), tz)
    if word == "week-ago":
        return _midnight(today - timedelta(days=7), tz)
    if word == "this-month":
        return _midnight(today.replace(day=1), tz)
    assert word == "this-year"
    return _midnight(today.replace(month=1, day=1), tz)


def _zone(text: str) -> tuple[str, str | None]:
    m = _ZONE.search(text)
    if m is None:
        return text, None
    return text[: m.start()], m.group(1)


def parse_time(
    words: Sequence[str], now: datetime, *, end: bool = False, boot: datetime | None = None
) -> datetime:
    """The instant `words` name (aware, in `now`'s zone unless a zone is written)."""
    if not 1 <= len(words) <= 2:
        raise QueryError("a time is one or two words (a keyword, a date and/or a time)")
    text = " ".join(words).strip()
    if len(words) == 1 and text in KEYWORDS:
        return _keyword(text, now, boot)
    body, zone = _zone(text.replace("T", " ", 1) if _DATE.match(text) else text)
    parts = body.split()
    day: date | None = None
    clock: str | None = None
    for part in parts:
        if _DATE.fullmatch(part) and day is None:
            try:
                day = date.fromisoformat(part)
            except ValueError:
                raise QueryError(f"{part!r} is not a date") from None
        elif _TIME.fullmatch(part) and clock is None:
            clock = part
        else:
            raise QueryError(
                f"cannot read the time {text!r}: use a keyword ({', '.join(KEYWORDS)}), "
                "YYYY-MM-DD, HH:MM[:SS] or both"
            )
    if clock is not None and clock[1] == ":":
        clock = "0" + clock
    try:
        when = time.fromisoformat(clock) if clock else None
    except ValueError:
        raise QueryError(f"{clock!r} is not a time of day") from None
    tz: tzinfo | None = now.tzinfo
    if zone is not None:
        offset = "+00:00" if zone == "Z" else zone
        tz = datetime.fromisoformat(f"2000-01-01T00:00:00{offset}").tzinfo
    base = day if day is not None else now.date()
    if when is None:
        start = datetime.combine(base, time(), tz)
        return start + timedelta(days=1, microseconds=-1) if end else start
    return datetime.combine(base, when, tz)


def record_time(record: Record) -> datetime | None:
    """The record's ``time`` as an aware datetime (None if it does not read)."""
    try:
        return datetime.fromisoformat(record.time.replace("Z", "+00:00"))
    except ValueError:
        return None


def _bare(label: str) -> str:
    return label.rsplit(":", 1)[-1] if label.startswith("ACM:") else label


def _parties(record: Record) -> list[Mapping[str, object]]:
    body = record.body
    found: list[Mapping[str, object]] = [body]  # relabel, veto-retry …: domid/name/uuid at the top
    for key in ("subject", "object"):
        value = body.get(key)
        if isinstance(value, dict):
            found.append(value)
    clients = body.get("clients")
    if isinstance(clients, list):
        found.extend(c for c in clients if isinstance(c, dict))
    return found


@attrs.frozen
class Query:
    """What `matches` keeps: every given criterion must hold; several values of one are OR."""

    start: datetime | None = None
    end: datetime | None = None
    domains: tuple[str, ...] = ()
    labels: tuple[str, ...] = ()
    hooks: tuple[str, ...] = ()
    decision: str | None = None
    kinds: tuple[str, ...] = ()

    def matches(self, record: Record) -> bool:
        body = record.body
        if self.kinds and str(record.kind) not in self.kinds:
            return False
        if self.decision is not None and body.get("decision") != self.decision:
            return False
        if self.hooks and body.get("hook") not in self.hooks:
            return False
        if self.start is not None or self.end is not None:
            when = record_time(record)
            if when is None:
                return False
            if self.start is not None and when < self.start:
                return False
            if self.end is not None and when > self.end:
                return False
        if self.domains and not self._domain(record):
            return False
        return not self.labels or self._label(record)

    def _domain(self, record: Record) -> bool:
        wanted = {d.lower() for d in self.domains}
        for p in _parties(record):
            for key in ("name", "uuid", "domid"):
                value = p.get(key)
                if (
                    value is not None
                    and not isinstance(value, bool)
                    and str(value).lower() in wanted
                ):
                    return True
        return False

    def _label(self, record: Record) -> bool:
        wanted = {_bare(w) for w in self.labels}
        body = record.body
        candidates: list[object] = [p.get("label") for p in _parties(record)]
        candidates += [body.get("old"), body.get("new")]  # relabel, resource-label
        resource = body.get("resource")
        if isinstance(resource, dict):
            candidates.append(resource.get("label"))
        return any(isinstance(c, str) and _bare(c) in wanted for c in candidates)


def select(records: Iterable[Record], query: Query, last: int | None = None) -> list[Record]:
    """The records `query` matches, in order; only the `last` of them when given."""
    found = [r for r in records if query.matches(r)]
    return found if last is None else found[-last:] if last > 0 else []
