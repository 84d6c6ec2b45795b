"""Where the front ends send twisted.logger's events: one line per event to a stream."""

from __future__ import annotations

import sys
from typing import Any, TextIO

from twisted.logger import (
    FilteringLogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    globalLogBeginner,
    textFileLogObserver,
)

#: The ``--log-level`` choices.
LEVELS = {"debug": LogLevel.debug, "info": LogLevel.info, "warn": LogLevel.warn}


def start_logging(level: str, stream: TextIO = sys.stderr) -> None:
    """twisted.logger to `stream`, one line per event at `level` and above."""
    # zope interfaces do not type-check: the observers are declared Any.
    predicate: Any = LogLevelFilterPredicate(defaultLogLevel=LEVELS[level])
    text: Any = textFileLogObserver(stream)
    observer: Any = FilteringLogObserver(text, [predicate])
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)
