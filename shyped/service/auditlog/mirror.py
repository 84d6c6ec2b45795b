"""Denials mirrored to the system log (journald, or syslog)."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Protocol

from twisted.logger import Logger

from shyped.core.audit import (
    Record,
)

_log = Logger(namespace="shyped.audit")


class Mirror(Protocol):
    """Where denials are mirrored, one line each."""

    def denial(self, line: str, record: Record) -> None: ...


class JournalMirror:
    """Denials to journald with the record's seq and hook as fields (``python3-systemd``)."""

    def __init__(self) -> None:
        journal = importlib.import_module("systemd.journal")  # optional: python3-systemd
        self._send: Callable[..., None] = journal.send

    def denial(self, line: str, record: Record) -> None:
        self._send(
            line,
            SYSLOG_IDENTIFIER="shyped",
            PRIORITY=4,
            SHYPED_SEQ=str(record.seq),
            SHYPED_HOOK=str(record.body.get("hook", "")),
        )


class SyslogMirror:
    """Denials to syslog (authpriv.warning), where journald picks them up too."""

    def __init__(self) -> None:
        import syslog

        self._syslog = syslog
        syslog.openlog("shyped", syslog.LOG_PID, syslog.LOG_AUTHPRIV)

    def denial(self, line: str, record: Record) -> None:
        self._syslog.syslog(self._syslog.LOG_WARNING, line)


def system_mirror() -> Mirror:
    """journald if `systemd.journal` is importable, else syslog."""
    try:
        return JournalMirror()
    except ImportError:
        return SyslogMirror()
