"""Where the front ends send twisted.logger's events: one line per event to a stream.

Two formats (``[log] format``, ``shyped --log-format``): ``text`` (twisted's classic
``<time> [<namespace>#<level>] <message>``) and ``json`` (one object per line: ``time``,
``level``, ``priority``, ``namespace``, ``message``, plus the event's own plain fields).

When stderr *is* the journal (systemd sets ``$JOURNAL_STREAM`` to the device and inode of
the stream it connected; sd-daemon(3)), every line starts with ``<N>``, its syslog priority,
which journald strips and keeps as the entry's priority: ``journalctl -p warning -u shyped``
then shows the denials (logged at warn). The timestamp is left out there (journald has its
own). Every line of a multi-line message carries the prefix, so a traceback stays at its
event's priority.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, Final, TextIO

from twisted.logger import (
    FilteringLogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    formatEvent,
    formatEventAsClassicLogText,
    globalLogBeginner,
)

#: The ``--log-level`` choices.
LEVELS = {"debug": LogLevel.debug, "info": LogLevel.info, "warn": LogLevel.warn}
#: The ``--log-format`` / ``[log] format`` choices.
FORMATS: Final = ("text", "json")

#: syslog priorities (sd-daemon(3) ``<N>`` prefixes) of twisted's levels.
PRIORITY: Final = {
    LogLevel.debug: 7,
    LogLevel.info: 6,
    LogLevel.warn: 4,
    LogLevel.error: 3,
    LogLevel.critical: 2,
}


def stream_is_journal(stream: TextIO, environ: Mapping[str, str] = os.environ) -> bool:
    """True if `stream` is the journal stream systemd connected (``$JOURNAL_STREAM`` is
    ``<st_dev>:<st_ino>`` of it); a redirected stderr under systemd is not."""
    value = environ.get("JOURNAL_STREAM", "")
    dev, sep, ino = value.partition(":")
    if not sep or not dev.isdecimal() or not ino.isdecimal():
        return False
    try:
        st = os.fstat(stream.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return (st.st_dev, st.st_ino) == (int(dev), int(ino))


def _plain(value: object) -> bool:
    return value is None or isinstance(value, str | int | float | bool)


def format_json(event: Mapping[str, Any]) -> str:
    """One JSON object for `event` (no newline)."""
    level = event.get("log_level", LogLevel.info)
    when = event.get("log_time")
    doc: dict[str, Any] = {
        "time": None
        if when is None
        else datetime.fromtimestamp(when, UTC).isoformat(timespec="microseconds"),
        "level": getattr(level, "name", str(level)),
        "priority": PRIORITY.get(level, 6),
        "namespace": event.get("log_namespace", "-"),
        "message": formatEvent(dict(event)),
    }
    failure = event.get("log_failure")
    if failure is not None:
        doc["traceback"] = failure.getTraceback()
    for key, value in event.items():
        if not key.startswith("log_") and key not in doc and _plain(value):
            doc[key] = value
    return json.dumps(doc, ensure_ascii=False, default=str)


def format_text(event: Mapping[str, Any], *, timestamp: bool = True) -> str:
    """twisted's classic line (with the traceback of a failure), without its newline."""
    if timestamp:
        text = formatEventAsClassicLogText(dict(event)) or ""
        return text.rstrip("\n")
    level = event.get("log_level", LogLevel.info)
    system = f"{event.get('log_namespace', '-')}#{getattr(level, 'name', level)}"
    text = formatEvent(dict(event))
    failure = event.get("log_failure")
    if failure is not None:
        text += "\n" + failure.getTraceback().rstrip("\n")
    return f"[{system}] {text}" if text else ""


class LineObserver:
    """Writes each event as one line (several for a traceback) in `fmt`, with sd-daemon
    priority prefixes when `journal`."""

    def __init__(self, stream: TextIO, fmt: str = "text", *, journal: bool = False) -> None:
        self.stream = stream
        self.fmt = fmt
        self.journal = journal

    def __call__(self, event: Mapping[str, Any]) -> None:
        if self.fmt == "json":
            text = format_json(event)
        else:
            text = format_text(event, timestamp=not self.journal)
        if not text:
            return  # an event with nothing to say (as twisted's own observer skips it)
        if self.journal:
            prefix = f"<{PRIORITY.get(event.get('log_level', LogLevel.info), 6)}>"
            text = "\n".join(prefix + line for line in text.split("\n"))
        try:
            self.stream.write(text + "\n")
            self.stream.flush()
        except (OSError, ValueError):
            pass  # a closed stderr must not take the daemon down


def start_logging(level: str, stream: TextIO = sys.stderr, fmt: str = "text") -> LineObserver:
    """twisted.logger to `stream`, one line per event at `level` and above."""
    line: Any = LineObserver(stream, fmt, journal=stream_is_journal(stream))
    # zope interfaces do not type-check: the observers are declared Any.
    predicate: Any = LogLevelFilterPredicate(defaultLogLevel=LEVELS[level])
    observer: Any = FilteringLogObserver(line, [predicate])
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)
    result: LineObserver = line
    return result
