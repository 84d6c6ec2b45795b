"""The audit directory's files: the state file, the log files, reading lines, durable writes."""

from __future__ import annotations

import errno
import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

import attrs
from twisted.logger import Logger

from shyped.core.audit import canonical_bytes
from shyped.core.auditverify import Anchor
from shyped.service.auditlog.settings import (
    FILE_RE,
    STATE_SIZE,
)

_log = Logger(namespace="shyped.audit")


# ------------------------------------------------------------------------------- state file


def encode_state(anchor: Anchor) -> bytes:
    """The state file's content: JSON with a checksum, padded to `STATE_SIZE` bytes."""
    fields = {"log": anchor.log, "seq": anchor.seq, "hash": anchor.hash, "file": anchor.file}
    fields["check"] = hashlib.sha256(canonical_bytes(fields)).hexdigest()[:16]
    data = canonical_bytes(fields)
    if len(data) >= STATE_SIZE:
        raise ValueError("state too long")
    return data + b" " * (STATE_SIZE - 1 - len(data)) + b"\n"


def decode_state(data: bytes) -> tuple[Anchor | None, str]:
    """(anchor, status) from a state file's bytes; status is ``ok``, ``missing`` or ``corrupt``."""
    if not data.strip():
        return None, "missing"
    try:
        fields = json.loads(data)
        check = fields.pop("check")
        good = hashlib.sha256(canonical_bytes(fields)).hexdigest()[:16] == check
        anchor = Anchor(
            log=str(fields["log"]),
            seq=int(fields["seq"]),
            hash=str(fields["hash"]),
            file=None if fields["file"] is None else str(fields["file"]),
        )
    except (ValueError, KeyError, TypeError, AttributeError):
        return None, "corrupt"
    return (anchor, "ok") if good else (None, "corrupt")


def read_state(path: Path) -> tuple[Anchor | None, str]:
    """The state file at `path` (see `decode_state`)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None, "missing"
    return decode_state(data)


# ------------------------------------------------------------------------------- files


@attrs.define
class _LogFile:
    first_seq: int
    path: Path
    first_prev: str | None = None  # prev of its first record, read when needed


def list_log_files(directory: Path) -> list[Path]:
    """The log files in `directory`, oldest first."""
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    found = sorted((int(m.group(1)), n) for n in names if (m := FILE_RE.fullmatch(n)))
    return [directory / n for _, n in found]


def _first_seq(path: Path) -> int:
    m = FILE_RE.fullmatch(path.name)
    assert m is not None
    return int(m.group(1))


def split_lines(data: bytes) -> list[bytes]:
    """`data` cut after each ``\\n`` (only ``\\n``: a record may contain other breaks)."""
    parts = data.split(b"\n")
    lines = [p + b"\n" for p in parts[:-1]]
    if parts[-1]:
        lines.append(parts[-1])
    return lines


def read_lines(path: Path) -> Iterator[bytes]:
    """The lines of `path` with their ``\\n`` (binary files split on ``\\n`` only)."""
    with path.open("rb") as f:
        yield from f


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        if n <= 0:  # pragma: no cover - regular files never return 0 for a non-empty write
            raise OSError(errno.EIO, "short write")
        view = view[n:]
