"""The audit log on disk: append-only writer, rotation, retention, crash recovery, disk full.

Layout of the audit directory (created 0750; files 0600, or 0640 and group-owned when a read
group is configured)::

    audit-000000000000.jsonl   records seq 0 … (the name is the seq of the file's first record)
    audit-000000004711.jsonl   the newest file: begins with a ``rotate`` record
    audit.state                the chain head after the last fsync (seq, hash, log id, file)
    audit-….jsonl.torn[.N]     bytes quarantined by a crash recovery, if any

Writing is group commit: `AuditLog.append` seals a record into the chain in memory and
`AuditLog.flush` writes every pending record with one ``write`` and one ``fdatasync``, then
updates the state file. Nothing is durable, and no enforcing action may be reported done,
before the `flush` covering its record returned. The daemon uses `AsyncAuditLog`, which does
exactly that on a writer thread: `append` returns a Deferred that fires once the record is on
stable storage, and records arriving while an fsync runs are committed together by the next.

Write errors (disk full, EIO) are handled per ``disk_full_action`` as auditd does:
``fail-closed`` (default) undoes the partial write, refuses the batch (`AuditUnavailable`) and
every record after it until a write succeeds again, with `AuditLog.healthy` false and the
listeners told, so the daemon denies new admissions and devices; ``ignore`` drops the records
and carries on. Either way the first record written afterwards is ``audit-resumed`` saying how
many records were refused or lost, and the chain continues unbroken.

At `AuditLog.open` the writer locks the state file (one writer per directory), takes the last
well-formed record of the newest file as the head, moves anything after it (an interrupted
write) to a quarantine file, compares the head with the state file, and writes a
``log-recovered`` record documenting whatever it found. What `verify` can detect with and
without the state file is described in docs/audit.md.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import fcntl
import grp
import hashlib
import importlib
import json
import os
import re
import secrets
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Final, Generic, Protocol, TypeVar

import attrs
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from twisted.internet.defer import Deferred
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from shyped.core import audit
from shyped.core.audit import (
    GENESIS,
    Anchor,
    Draft,
    Kind,
    Party,
    Record,
    RecordError,
    VerifyReport,
    canonical_bytes,
    decision_draft,
    event_draft,
    format_denial,
    format_time,
    make_draft,
    parse_record,
    seal,
)
from shyped.policy.decisions import Decision

_log = Logger(namespace="shyped.audit")

DEFAULT_DIRECTORY: Final = Path("/var/log/shyped/audit")
STATE_NAME: Final = "audit.state"
STATE_SIZE: Final = 512
FILE_RE: Final = re.compile(r"audit-(\d{12})\.jsonl")
DIR_MODE: Final = 0o750


def log_file_name(first_seq: int) -> str:
    """The name of the log file whose first record has `first_seq`."""
    return f"audit-{first_seq:012d}.jsonl"


class DiskFullAction(enum.StrEnum):
    """What a write error does (auditd's ``disk_full_action``)."""

    FAIL_CLOSED = "fail-closed"
    IGNORE = "ignore"


class AuditState(enum.StrEnum):
    """Whether records reach stable storage."""

    OK = "ok"
    UNAVAILABLE = "unavailable"  # fail-closed after a write error: records are refused
    DEGRADED = "degraded"  # ignore after a write error: records are dropped


class AuditUnavailable(Exception):
    """The audit log cannot write (fail-closed): the action must not be reported done."""


class AuditLogBusy(Exception):
    """Another process holds the audit directory."""


@attrs.frozen
class AuditSettings:
    """The ``[audit]`` settings: where, how big, how many, what a write error does."""

    directory: Path = DEFAULT_DIRECTORY
    max_file_bytes: int = attrs.field(default=8 << 20)
    keep_files: int = attrs.field(default=16)  # files kept, the current one included; 0: all
    disk_full_action: DiskFullAction = DiskFullAction.FAIL_CLOSED
    retry_interval: float = 5.0  # seconds between write attempts while fail-closed
    mirror_denials: bool = False  # one journald/syslog line per denial
    group: str | None = None  # files 0640 owned by this group (readers); else 0600

    @max_file_bytes.validator
    def _check_size(self, _a: object, v: int) -> None:
        if v < 1024:
            raise ValueError(f"audit max_file_bytes must be at least 1024, not {v}")

    @keep_files.validator
    def _check_keep(self, _a: object, v: int) -> None:
        if v < 0:
            raise ValueError(f"audit keep_files must be 0 (keep all) or more, not {v}")


@attrs.define
class AuditStats:
    """Counters for metrics and tests."""

    records_written: int = 0
    batches: int = 0
    bytes_written: int = 0
    write_errors: int = 0
    refused: int = 0
    lost: int = 0
    rotations: int = 0
    files_removed: int = 0
    state_errors: int = 0
    recoveries: int = 0
    last_error: str | None = None


# ------------------------------------------------------------------------------- mirror


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


# ------------------------------------------------------------------------------- writer

T = TypeVar("T")
Listener = Callable[[AuditState, str], None]


class _Recorder(Generic[T]):
    """`record_decision` / `record_event`, the calls the daemon makes, over some `append`."""

    def append(self, draft: Draft) -> T:
        raise NotImplementedError

    def now(self) -> str:
        raise NotImplementedError

    def record_decision(
        self,
        decision: Decision,
        *,
        subject: Party,
        obj: Party | None = None,
        policy_sha256: str | None = None,
        mode: str | None = None,
        **details: object,
    ) -> T:
        """Audit one access decision (see `shyped.core.audit.decision_draft`)."""
        return self.append(
            decision_draft(
                decision,
                self.now(),
                subject=subject,
                obj=obj,
                policy_sha256=policy_sha256,
                mode=mode,
                **details,
            )
        )

    def record_event(self, kind: str | Kind, **details: object) -> T:
        """Audit a daemon event: policy load/reject, mode change, relabel, start/stop …"""
        return self.append(event_draft(kind, self.now(), **details))


@attrs.define
class _Pending:
    record: Record
    new_file: bool  # this record begins a new file
    counted: bool  # a caller's record (not the log's own bookkeeping)
    removes: tuple[_LogFile, ...] = ()  # files retention removes once this record is durable


@attrs.define
class _Outage:
    since: str
    error: str
    refused: int = 0
    lost: int = 0
    failed_writes: int = 0
    kinds: Counter[str] = attrs.field(factory=Counter)


class AuditLog(_Recorder[Record]):
    """The synchronous writer. Not thread-safe: one thread appends and flushes.

    `append` (or `record_decision` / `record_event`) seals records into the chain in memory;
    `flush` makes them durable (one write, one fdatasync, then the state file) and raises
    `AuditUnavailable` if it could not (fail-closed). `durable=False` skips the fsyncs, for
    benchmarks only.
    """

    def __init__(
        self,
        settings: AuditSettings,
        *,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        mirror: Mirror | None = None,
        durable: bool = True,
    ) -> None:
        self.settings: Final = settings
        self.stats = AuditStats()
        self._clock = clock
        self._monotonic = monotonic
        if mirror is None and settings.mirror_denials:
            mirror = system_mirror()
        self._mirror = mirror
        self._durable = durable
        self._dir = settings.directory
        self._mode = 0o640 if settings.group else 0o600
        self._gid = -1
        self._listeners: list[Listener] = []
        self._state = AuditState.OK
        self._outage: _Outage | None = None
        self._last_attempt = float("-inf")
        self._open = False
        self._state_fd = -1
        # committed
        self._log_id = ""
        self._head_seq = -1
        self._head_hash = GENESIS
        self._files: list[_LogFile] = []
        self._fd: int | None = None
        self._offset = 0
        self._file_records = 0
        self._tail_dirty = False
        # pending (sealed, not yet durable)
        self._pending: list[_Pending] = []
        self._carry: list[Draft] = []  # the log's own records to write again after a failure
        self._reset_pending()

    # ----------------------------------------------------------------- public

    @property
    def state(self) -> AuditState:
        return self._state

    @property
    def healthy(self) -> bool:
        """Records reach stable storage."""
        return self._state is AuditState.OK

    @property
    def available(self) -> bool:
        """False while fail-closed after a write error: the daemon must deny new admissions."""
        return self._state is not AuditState.UNAVAILABLE

    @property
    def log_id(self) -> str:
        return self._log_id

    @property
    def head(self) -> tuple[int, str]:
        """(seq, hash) of the last durable record."""
        return self._head_seq, self._head_hash

    @property
    def current_file(self) -> Path | None:
        return self._files[-1].path if self._files and self._fd is not None else None

    @property
    def pending(self) -> int:
        return len(self._pending)

    def add_listener(self, listener: Listener) -> None:
        """`listener(state, reason)` is called on every change of `state` (writer's thread)."""
        self._listeners.append(listener)

    def now(self) -> str:
        return format_time(self._clock())

    def open(self) -> None:
        """Create or continue the log in the directory; recover from a crash if needed."""
        if self._open:
            return
        self._setup_directory()
        path = self._dir / STATE_NAME
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, self._mode)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise AuditLogBusy(f"{self._dir}: the audit log is in use by another process") from None
        self._state_fd = fd
        self._secure(fd)
        anchor, status = decode_state(os.pread(fd, STATE_SIZE, 0))
        self._open = True
        try:
            self._recover(anchor, status)
        except BaseException:
            self.close()
            raise

    def append(self, draft: Draft) -> Record:
        """Seal `draft` into the chain (not yet durable: `flush`).

        Raises `AuditUnavailable` while fail-closed and a retry (at most one per
        ``retry_interval``) fails; the record is counted as refused.
        """
        self._require_open()
        if self._state is AuditState.UNAVAILABLE:
            due = self._monotonic() - self._last_attempt >= self.settings.retry_interval
            if not (due and self.try_resume()):
                self._refuse(draft)
                raise AuditUnavailable(self._unavailable_text())
        if self._outage is not None and not self._resume_sealed:  # ignore mode, after errors
            self._seal_resumed()
        return self._seal(draft, counted=True)

    def append_many(self, drafts: Iterable[Draft]) -> list[Record]:
        return [self.append(d) for d in drafts]

    def flush(self) -> bool:
        """Make every pending record durable. True if written; False if dropped (ignore).

        Raises `AuditUnavailable` (fail-closed) when the write failed; the pending records are
        then refused and nothing of them stays in the file.
        """
        self._require_open()
        if not self._pending:
            return True
        batch = self._pending
        created: list[tuple[Path, int]] = []
        try:
            new_fd, new_offset, new_records = self._write_batch(batch, created)
            for _, cfd in created[:-1]:  # files filled and left behind within this batch
                os.close(cfd)
        except OSError as e:
            self._rollback(batch, created, e)
            if self.settings.disk_full_action is DiskFullAction.FAIL_CLOSED:
                raise AuditUnavailable(self._unavailable_text()) from e
            return False
        self._commit(batch, new_fd, new_offset, new_records)
        return True

    def commit(self, draft: Draft) -> Record:
        """`append` + `flush`: one durable record (unless ``ignore`` had to drop it)."""
        rec = self.append(draft)
        self.flush()
        return rec

    def try_resume(self) -> bool:
        """After write errors: try to write again (an ``audit-resumed`` record). True if OK."""
        self._require_open()
        if self._outage is None:
            return True
        self._last_attempt = self._monotonic()
        if not self._resume_sealed:
            self._seal_resumed()
        try:
            return self.flush()
        except AuditUnavailable:
            return False

    def close(self) -> None:
        """Flush what is pending (errors are logged, not raised) and release the directory."""
        if not self._open:
            return
        if self._pending:
            n = sum(1 for p in self._pending if p.counted)
            try:
                self.flush()
            except AuditUnavailable:
                _log.error("audit: {n} record(s) not written at close", n=n)
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._state_fd >= 0:
            os.close(self._state_fd)  # releases the lock
            self._state_fd = -1
        self._open = False

    def __enter__(self) -> AuditLog:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ----------------------------------------------------------------- setup / recovery

    def _require_open(self) -> None:
        if not self._open:
            raise RuntimeError("the audit log is not open")

    def _setup_directory(self) -> None:
        if self.settings.group is not None:
            try:
                self._gid = grp.getgrnam(self.settings.group).gr_gid
            except KeyError:
                raise ValueError(f"audit group {self.settings.group!r} does not exist") from None
        if not self._dir.is_dir():
            self._dir.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
            os.chmod(self._dir, DIR_MODE)
            if self._gid >= 0:
                os.chown(self._dir, -1, self._gid)

    def _secure(self, fd: int) -> None:
        os.fchmod(fd, self._mode)
        if self._gid >= 0:
            os.fchown(fd, -1, self._gid)

    def _recover(self, anchor: Anchor | None, status: str) -> None:
        paths = list_log_files(self._dir)
        notes: dict[str, object] = {}
        removed_files: list[str] = []
        quarantined: list[tuple[str, bytes, int]] = []  # (file, tail bytes, complete lines)
        head: Record | None = None
        while paths:
            path = paths[-1]
            data = path.read_bytes()
            lines = split_lines(data)
            keep = 0
            for i in range(len(lines) - 1, -1, -1):
                try:
                    head = parse_record(lines[i])
                except RecordError:
                    continue
                keep = i + 1
                break
            tail = b"".join(lines[keep:])
            if tail:
                damaged = sum(1 for ln in lines[keep:] if ln.endswith(b"\n"))
                qname = self._quarantine(path, len(data) - len(tail), tail)
                quarantined.append((qname, tail, damaged))
            if head is not None:
                break
            path.unlink()  # nothing valid in it: empty, or only an interrupted first write
            _fsync_dir(self._dir)
            removed_files.append(path.name)
            paths.pop()

        if head is None:
            self._new_log(anchor, removed_files)
            return

        self._log_id = head.log
        self._files = [_LogFile(_first_seq(p), p) for p in paths]
        cur = paths[-1]
        self._fd = os.open(cur, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        self._offset = os.fstat(self._fd).st_size
        self._file_records = 1  # it holds the head; only "non-empty" matters for rotation
        self._head_seq, self._head_hash = head.seq, head.hash
        self._reset_pending()

        # The head against the state file.
        if status == "ok" and anchor is not None:
            if anchor.log != head.log:
                status = "foreign"
            elif anchor.seq > head.seq:
                status = "ahead"
                notes["lost_records"] = anchor.seq - head.seq
            elif anchor.seq == head.seq and anchor.hash != head.hash:
                status = "mismatch"
                notes["lost_records"] = 1
            elif anchor.seq < head.seq:
                status = "behind"
        if anchor is not None:
            notes.update(state_seq=anchor.seq, state_hash=anchor.hash, state_file=anchor.file)
        if quarantined:
            names = [q for q, _, _ in quarantined]
            tail_all = b"".join(t for _, t, _ in quarantined)
            notes.update(
                torn_bytes=len(tail_all),
                damaged_lines=sum(d for _, _, d in quarantined),
                quarantine=names[0] if len(names) == 1 else names,
                quarantine_sha256=hashlib.sha256(tail_all).hexdigest(),
            )
        if removed_files:
            notes["removed_files"] = removed_files
        if status not in ("ok", "behind") or quarantined or removed_files:
            self.stats.recoveries += 1
            _log.warn(
                "audit: recovered the log in {dir} after seq {seq} (state {status}, "
                "{torn} byte(s) quarantined)",
                dir=str(self._dir),
                seq=head.seq,
                status=status,
                torn=notes.get("torn_bytes", 0),
            )
            draft = make_draft(
                Kind.LOG_RECOVERED, self.now(), {"after_seq": head.seq, "state": status, **notes}
            )
            self._carry.append(draft)
            self._write_carried()
        else:
            self._write_state()

    def _quarantine(self, path: Path, keep: int, tail: bytes) -> str:
        """Copy the bytes after the last good record of `path` aside, then cut them off."""
        qpath = path.with_name(f"{path.name}.torn")
        n = 1
        while qpath.exists():
            n += 1
            qpath = path.with_name(f"{path.name}.torn.{n}")
        fd = os.open(qpath, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, self._mode)
        try:
            self._secure(fd)
            _write_all(fd, tail)
            os.fsync(fd)
        finally:
            os.close(fd)
        _fsync_dir(self._dir)
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.ftruncate(fd, keep)
            os.fsync(fd)
        finally:
            os.close(fd)
        return qpath.name

    def _new_log(self, anchor: Anchor | None, removed_files: list[str]) -> None:
        self._log_id = secrets.token_hex(16)
        self._files = []
        self._fd = None
        self._offset = 0
        self._file_records = 0
        self._head_seq, self._head_hash = -1, GENESIS
        self._reset_pending()
        details: dict[str, object] = {"format": audit.FORMAT_VERSION, "host": socket.gethostname()}
        if anchor is not None:  # a state file names a log whose files are gone
            details.update(
                previous_log=anchor.log, previous_seq=anchor.seq, previous_hash=anchor.hash
            )
            _log.critical(
                "audit: no log files in {dir}, but the state file names log {log} at seq "
                "{seq}: starting a new log",
                dir=str(self._dir),
                log=anchor.log,
                seq=anchor.seq,
            )
        if removed_files:
            details["removed_files"] = removed_files
        self._carry.append(make_draft(Kind.LOG_START, self.now(), details))
        self._write_carried()

    def _write_carried(self) -> None:
        """Write the log's own pending records now (start/recovery); an error starts an outage."""
        for d in self._carry:
            self._seal(d, counted=False)
        self._carry = []
        with contextlib.suppress(AuditUnavailable):
            self.flush()

    # ----------------------------------------------------------------- sealing

    def _reset_pending(self) -> None:
        self._pending = []
        self._pend_seq = self._head_seq + 1
        self._pend_hash = self._head_hash
        self._pend_size = self._offset
        self._pend_records = self._file_records
        self._pend_files = list(self._files)
        self._pend_has_file = self._fd is not None
        self._resume_sealed = False

    def _seal(self, draft: Draft, *, counted: bool) -> Record:
        new_file = False
        if not self._pend_has_file:  # the log's very first record opens its first file
            new_file = True
        elif self._pend_size >= self.settings.max_file_bytes and self._pend_records > 0:
            self._seal_rotate()
        rec = seal(draft, log=self._log_id, seq=self._pend_seq, prev=self._pend_hash)
        if new_file:
            self._switch_pending(rec)
        self._pending.append(_Pending(rec, new_file, counted))
        self._pend_seq += 1
        self._pend_hash = rec.hash
        self._pend_size += len(rec.line)
        self._pend_records += 1
        return rec

    def _switch_pending(self, first: Record) -> None:
        self._pend_files.append(
            _LogFile(first.seq, self._dir / log_file_name(first.seq), first.prev)
        )
        self._pend_has_file = True
        self._pend_size = 0
        self._pend_records = 0

    def _seal_rotate(self) -> None:
        prev_file = self._pend_files[-1].path.name
        draft = make_draft(
            Kind.ROTATE,
            self.now(),
            {"prev_file": prev_file, "file": log_file_name(self._pend_seq)},
        )
        rec = seal(draft, log=self._log_id, seq=self._pend_seq, prev=self._pend_hash)
        self._switch_pending(rec)
        self._pending.append(_Pending(rec, True, False))
        self._pend_seq += 1
        self._pend_hash = rec.hash
        self._pend_size += len(rec.line)
        self._pend_records += 1
        keep = self.settings.keep_files
        if keep and len(self._pend_files) > keep:
            gone = tuple(self._pend_files[:-keep])
            self._pend_files = self._pend_files[-keep:]
            first_kept = self._pend_files[0]
            body = {
                "removed": [f.path.name for f in gone],
                "removed_through_seq": first_kept.first_seq - 1,
                "removed_last_hash": self._first_prev(first_kept),
            }
            rrec = seal(
                make_draft(Kind.RETENTION, self.now(), body),
                log=self._log_id,
                seq=self._pend_seq,
                prev=self._pend_hash,
            )
            self._pending.append(_Pending(rrec, False, False, gone))
            self._pend_seq += 1
            self._pend_hash = rrec.hash
            self._pend_size += len(rrec.line)
            self._pend_records += 1

    def _first_prev(self, f: _LogFile) -> str | None:
        if f.first_prev is None:
            try:
                with f.path.open("rb") as fh:
                    f.first_prev = parse_record(fh.readline()).prev
            except (OSError, RecordError):
                return None
        return f.first_prev

    def _seal_resumed(self) -> None:
        o = self._outage
        assert o is not None
        for d in self._carry:  # e.g. the log-start that failed at open
            self._seal(d, counted=False)
        self._carry = []
        body = {
            "action": str(self.settings.disk_full_action),
            "since": o.since,
            "error": o.error,
            "failed_writes": o.failed_writes,
            "refused": o.refused,
            "lost": o.lost,
            "kinds": dict(o.kinds),
        }
        self._seal(make_draft(Kind.AUDIT_RESUMED, self.now(), body), counted=False)
        self._resume_sealed = True

    # ----------------------------------------------------------------- writing

    def _write_batch(
        self, batch: Sequence[_Pending], created: list[tuple[Path, int]]
    ) -> tuple[int, int, int]:
        """Write `batch` (switching files where it says so); (fd, size, records) of the last."""
        if self._tail_dirty and self._fd is not None:
            os.ftruncate(self._fd, self._offset)
            self._tail_dirty = False
        fd, offset, records = self._fd, self._offset, self._file_records
        chunk: list[bytes] = []
        for p in batch:
            if p.new_file:
                if chunk:
                    assert fd is not None
                    offset += self._write_chunk(fd, chunk)
                    chunk = []
                path = self._dir / log_file_name(p.record.seq)
                fd = os.open(
                    path,
                    os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC,
                    self._mode,
                )
                created.append((path, fd))
                self._secure(fd)
                offset, records = 0, 0
            chunk.append(p.record.line)
            records += 1
        assert fd is not None
        offset += self._write_chunk(fd, chunk)
        if created and self._durable:
            _fsync_dir(self._dir)
        return fd, offset, records

    def _write_chunk(self, fd: int, lines: list[bytes]) -> int:
        data = b"".join(lines)
        _write_all(fd, data)
        if self._durable:
            os.fdatasync(fd)
        return len(data)

    def _rollback(
        self, batch: Sequence[_Pending], created: list[tuple[Path, int]], err: OSError
    ) -> None:
        """Undo a failed batch: no byte of it stays, the head is the last durable record."""
        for path, fd in created:
            os.close(fd)
            with contextlib.suppress(OSError):
                path.unlink()
        if created:
            with contextlib.suppress(OSError):
                _fsync_dir(self._dir)
        if self._fd is not None:
            try:
                os.ftruncate(self._fd, self._offset)
            except OSError:
                self._tail_dirty = True
        self._carry = [
            Draft(p.record.kind, p.record.time, p.record.body)
            for p in batch
            if p.record.kind in (Kind.LOG_START, Kind.LOG_RECOVERED)
        ] + self._carry
        self._reset_pending()
        why = f"{err.strerror or err}" + (f" ({err.filename})" if err.filename else "")
        self.stats.write_errors += 1
        self.stats.last_error = why
        if self._outage is None:
            self._outage = _Outage(since=self.now(), error=why)
        o = self._outage
        o.failed_writes += 1
        counted = [p.record for p in batch if p.counted]
        fail_closed = self.settings.disk_full_action is DiskFullAction.FAIL_CLOSED
        for r in counted:
            o.kinds[r.kind] += 1
        if fail_closed:
            o.refused += len(counted)
            self.stats.refused += len(counted)
        else:
            o.lost += len(counted)
            self.stats.lost += len(counted)
        self._mirror_denials(counted, "refused" if fail_closed else "lost")
        self._last_attempt = self._monotonic()
        if fail_closed:
            _log.critical(
                "AUDIT UNAVAILABLE: cannot write {dir}: {why}; refusing {n} record(s) and "
                "denying new admissions and devices until it can write again "
                "(disk_full_action=fail-closed)",
                dir=str(self._dir),
                why=why,
                n=len(counted),
            )
            self._set_state(AuditState.UNAVAILABLE, why)
        else:
            _log.error(
                "AUDIT RECORDS LOST: cannot write {dir}: {why}; {n} record(s) dropped "
                "(disk_full_action=ignore)",
                dir=str(self._dir),
                why=why,
                n=len(counted),
            )
            self._set_state(AuditState.DEGRADED, why)

    def _commit(self, batch: Sequence[_Pending], fd: int, offset: int, records: int) -> None:
        if fd != self._fd:
            if self._fd is not None:
                os.close(self._fd)
            self._fd = fd
        self.stats.rotations += sum(1 for p in batch if p.record.kind == Kind.ROTATE)
        self._offset = offset
        self._file_records = records
        self._files = self._pend_files
        last = batch[-1].record
        self._head_seq, self._head_hash = last.seq, last.hash
        self.stats.batches += 1
        self.stats.records_written += len(batch)
        self.stats.bytes_written += sum(len(p.record.line) for p in batch)
        self._reset_pending()
        self._write_state()
        gone = [f for p in batch for f in p.removes]
        for f in gone:
            with contextlib.suppress(FileNotFoundError):
                f.path.unlink()
            self.stats.files_removed += 1
        if gone:
            with contextlib.suppress(OSError):
                _fsync_dir(self._dir)
        self._mirror_denials([p.record for p in batch if p.counted], None)
        if self._outage is not None:
            o, self._outage = self._outage, None
            _log.warn(
                "audit: writing again to {dir}; {r} record(s) were refused, {l} lost",
                dir=str(self._dir),
                r=o.refused,
                l=o.lost,
            )
            self._set_state(AuditState.OK, "writing again")

    def _write_state(self) -> None:
        anchor = Anchor(self._log_id, self._head_seq, self._head_hash, self._files[-1].path.name)
        try:
            os.pwrite(self._state_fd, encode_state(anchor), 0)
            if self._durable:
                os.fdatasync(self._state_fd)
        except OSError as e:
            self.stats.state_errors += 1
            _log.error("audit: cannot update {path}: {e}", path=STATE_NAME, e=str(e))

    def _refuse(self, draft: Draft) -> None:
        assert self._outage is not None
        self._outage.refused += 1
        self._outage.kinds[draft.kind] += 1
        self.stats.refused += 1
        if draft.kind == Kind.DECISION and draft.body.get("decision") == "deny":
            self._mirror_denials([seal(draft, log=self._log_id, seq=0, prev=GENESIS)], "refused")

    def _mirror_denials(self, records: Iterable[Record], audit_status: str | None) -> None:
        if self._mirror is None:
            return
        for r in records:
            if r.denied:
                line = format_denial(r)
                if audit_status is not None:  # the seq was never given out
                    line = line.rsplit(" seq=", 1)[0] + f" audit={audit_status}"
                try:
                    self._mirror.denial(line, r)
                except Exception as e:  # the mirror is best effort; the file is the record
                    _log.error("audit: denial mirror failed: {e}", e=str(e))

    def _unavailable_text(self) -> str:
        o = self._outage
        why = o.error if o else "unknown error"
        return f"audit unavailable: cannot write {self._dir}: {why}"

    def _set_state(self, state: AuditState, reason: str) -> None:
        if state is self._state:
            return
        self._state = state
        for listener in list(self._listeners):
            try:
                listener(state, reason)
            except Exception as e:
                _log.failure("audit: state listener failed: {e}", e=str(e))


# ------------------------------------------------------------------------------- async edge


class AsyncAuditLog(_Recorder["Deferred[Record]"]):
    """Group commit on a writer thread, for the daemon's reactor.

    `append` (reactor thread only) collects the record and returns a Deferred that fires with
    the sealed record once the fsync covering it returned, or fails with `AuditUnavailable`
    (fail-closed). The records of one reactor tick are handed to the writer thread together at
    the end of the tick, and more accumulate while it fsyncs: one tick's records, and those of
    every tick during an fsync, share one write and one fsync. Listeners and the `state` seen
    here run on the reactor thread.
    """

    def __init__(self, log: AuditLog, reactor: Any = None) -> None:
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        self.log: Final = log
        self._reactor = reactor
        self._cond = threading.Condition()
        self._queue: list[tuple[Draft | None, Deferred[Record] | None]] = []
        self._tick: list[tuple[Draft | None, Deferred[Record] | None]] = []
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._stopped: Deferred[None] | None = None
        self._state = log.state
        self._listeners: list[Listener] = []
        self._resume = LoopingCall(self._poke_resume)
        self._resume.clock = reactor
        log.add_listener(lambda s, why: reactor.callFromThread(self._state_changed, s, why))

    @property
    def state(self) -> AuditState:
        return self._state

    @property
    def healthy(self) -> bool:
        return self._state is AuditState.OK

    @property
    def available(self) -> bool:
        return self._state is not AuditState.UNAVAILABLE

    def add_listener(self, listener: Listener) -> None:
        """`listener(state, reason)` on every state change, on the reactor thread."""
        self._listeners.append(listener)

    def now(self) -> str:
        return self.log.now()

    def start(self) -> None:
        """Open the log (in the caller's thread) and start the writer thread."""
        self.log.open()
        self._state = self.log.state
        self._thread = threading.Thread(target=self._run, name="shyped-audit", daemon=True)
        self._thread.start()
        interval = self.log.settings.retry_interval
        self._resume.start(interval if interval > 0 else 1.0, now=False)

    def append(self, draft: Draft) -> Deferred[Record]:
        if self._stopped is not None:
            raise RuntimeError("the audit log is stopping")
        d: Deferred[Record] = Deferred()
        if not self._tick:
            self._reactor.callLater(0, self._hand_over)
        self._tick.append((draft, d))
        return d

    def _hand_over(self) -> None:
        """End of the tick: give this tick's records to the writer thread, as one batch."""
        with self._cond:
            self._queue.extend(self._tick)
            self._cond.notify()
        self._tick = []

    def stop(self) -> Deferred[None]:
        """Write what is queued, close the log; fires when the writer thread has finished."""
        if self._stopped is None:
            self._stopped = Deferred()
            if self._resume.running:
                self._resume.stop()
            if self._tick:
                self._hand_over()
            with self._cond:
                self._stopping = True
                self._cond.notify()
            if self._thread is None:
                self._stopped.callback(None)
        return self._stopped

    def _poke_resume(self) -> None:
        if self._state is not AuditState.OK:
            with self._cond:
                self._queue.append((None, None))
                self._cond.notify()

    def _state_changed(self, state: AuditState, why: str) -> None:
        self._state = state
        for listener in list(self._listeners):
            try:
                listener(state, why)
            except Exception as e:
                _log.failure("audit: state listener failed: {e}", e=str(e))

    def _run(self) -> None:
        try:
            while True:
                with self._cond:
                    while not self._queue and not self._stopping:
                        self._cond.wait()
                    batch, self._queue = self._queue, []
                    if not batch and self._stopping:
                        break
                self._commit(batch)
        finally:
            try:
                self.log.close()
            finally:
                self._reactor.callFromThread(self._finished)

    def _commit(self, batch: list[tuple[Draft | None, Deferred[Record] | None]]) -> None:
        done: list[tuple[Deferred[Record], Record | BaseException]] = []
        appended: list[tuple[Deferred[Record], Record]] = []
        for draft, d in batch:
            if draft is None:
                self.log.try_resume()
                continue
            assert d is not None
            try:
                appended.append((d, self.log.append(draft)))
            except Exception as e:
                done.append((d, e))
        if appended:
            try:
                self.log.flush()
                done.extend(appended)
            except Exception as e:
                done.extend((d, e) for d, _ in appended)
        if done:
            self._reactor.callFromThread(self._fire, done)

    @staticmethod
    def _fire(done: list[tuple[Deferred[Record], Record | BaseException]]) -> None:
        for d, result in done:
            if isinstance(result, BaseException):
                d.errback(result)
            else:
                d.callback(result)

    def _finished(self) -> None:
        if self._stopped is None:
            self._stopped = Deferred()
        if not self._stopped.called:
            self._stopped.callback(None)


# ------------------------------------------------------------------------------- metrics


class AuditCollector(Collector):
    """Prometheus metrics of an `AuditLog` (register it in the daemon's registry)."""

    def __init__(self, log: AuditLog) -> None:
        self._log = log

    def collect(self) -> Iterable[Metric]:
        s = self._log.stats
        yield GaugeMetricFamily(
            "shyped_audit_healthy",
            "1 while audit records reach stable storage, 0 after a write error",
            value=1 if self._log.healthy else 0,
        )
        yield GaugeMetricFamily(
            "shyped_audit_unavailable",
            "1 while the audit log refuses records (fail-closed): admissions are denied",
            value=0 if self._log.available else 1,
        )
        for name, doc, value in (
            ("records", "audit records written", s.records_written),
            ("write_errors", "failed audit writes (disk full, I/O error)", s.write_errors),
            ("records_refused", "audit records refused while fail-closed", s.refused),
            ("records_lost", "audit records dropped (disk_full_action=ignore)", s.lost),
            ("rotations", "audit log file rotations", s.rotations),
            ("recoveries", "audit log crash recoveries at start", s.recoveries),
        ):
            yield CounterMetricFamily(f"shyped_audit_{name}", doc, value=value)


# ------------------------------------------------------------------------------- reading


def verify_files(
    paths: Sequence[Path], *, anchor: Anchor | None = None, complete: bool = False
) -> VerifyReport:
    """`shyped.core.audit.verify_chain` over files (in the order given)."""
    return audit.verify_chain(
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


__all__ = [
    "DEFAULT_DIRECTORY",
    "STATE_NAME",
    "AsyncAuditLog",
    "AuditCollector",
    "AuditLog",
    "AuditLogBusy",
    "AuditSettings",
    "AuditState",
    "AuditStats",
    "AuditUnavailable",
    "DiskFullAction",
    "Follower",
    "JournalMirror",
    "Mirror",
    "SyslogMirror",
    "decode_state",
    "encode_state",
    "list_log_files",
    "log_file_name",
    "read_state",
    "system_mirror",
    "tail_records",
    "verify_directory",
    "verify_files",
]
