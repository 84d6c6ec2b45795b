"""Reading the audit directory: verifying the chain, the last records, following new ones."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from twisted.logger import Logger

from shyped.core import audit, auditverify
from shyped.core.audit import Record
from shyped.core.auditverify import Anchor, VerifyReport
from shyped.service.auditlog.files import (
    list_log_files,
    read_lines,
    read_state,
    split_lines,
)
from shyped.service.auditlog.settings import (
    STATE_NAME,
)

_log = Logger(namespace="shyped.audit")


def verify_files(
    paths: Sequence[Path], *, anchor: Anchor | None = None, complete: bool = False
) -> VerifyReport:
    """`shyped.core.auditverify.verify_chain` over files (in the order given)."""
    return auditverify.verify_chain(
        ((p.name, read_lines(p)) for p in paths), anchor=anchor, complete=complete
    )


def verify_directory(directory: Path) -> tuple[VerifyReport, str]:
    """Verify every log file of `directory` against its state file; (report, state status)."""
    anchor, status = read_state(directory / STATE_NAME)
    return verify_files(list_log_files(directory), anchor=anchor, complete=True), status


def tail_records(directory: Path, n: int, *, denied_only: bool = False) -> list[Record]:
    """The last `n` records of the log in `directory` (denials only if asked)."""
    found: list[Record] = []
    for path in reversed(list_log_files(directory)):
        recs = [r for r in audit.iter_parsed(read_lines(path)) if r.denied or not denied_only]
        found = recs + found
        if len(found) >= n:
            break
    return found[-n:] if n > 0 else []


class Follower:
    """New records of a log as they are written, across rotations (``tail -f``).

    Starts at the end of the newest file, or, with `after_seq`, at its beginning skipping
    records up to `after_seq` (so nothing written after a backlog was read is missed); `poll`
    returns the complete records written since the last call. Partial lines wait for their
    end; a file cut shorter (crash recovery) is followed from its new end.
    """

    def __init__(self, directory: Path, *, after_seq: int | None = None) -> None:
        self._dir = directory
        self._path: Path | None = None
        self._fh: Any = None
        self._pos = 0
        self._partial = b""
        self._after = after_seq
        files = list_log_files(directory)
        if files:
            self._open(files[-1], at_end=after_seq is None)

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def _open(self, path: Path, *, at_end: bool) -> None:
        self.close()
        self._path = path
        self._fh = path.open("rb")
        if at_end:
            data = self._fh.read()
            self._pos = data.rfind(b"\n") + 1
        else:
            self._pos = 0
        self._partial = b""

    def _newer(self) -> Path | None:
        files = list_log_files(self._dir)
        if self._path is None:
            return files[0] if files else None
        later = [p for p in files if p.name > self._path.name]
        return later[0] if later else None

    def _drain(self) -> list[Record]:
        if self._fh is None:
            return []
        size = os.fstat(self._fh.fileno()).st_size
        if size < self._pos + len(self._partial):  # cut shorter by a recovery
            self._pos = min(self._pos, size)
            self._partial = b""
        self._fh.seek(self._pos + len(self._partial))
        data = self._partial + self._fh.read()
        cut = data.rfind(b"\n") + 1
        self._partial = data[cut:]
        self._pos += cut
        recs = audit.iter_parsed(split_lines(data[:cut]))
        after = self._after
        return [r for r in recs if after is None or r.seq > after]

    def poll(self) -> list[Record]:
        out: list[Record] = []
        while True:
            newer = self._newer()
            out.extend(self._drain())
            if newer is None:
                return out
            self._open(newer, at_end=False)
