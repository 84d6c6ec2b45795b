"""The synchronous audit writer: append, flush (group commit), crash recovery, write errors.

See `shyped.service.auditlog` for the layout of the directory and what each part does."""

from __future__ import annotations

import contextlib
import fcntl
import grp
import hashlib
import os
import secrets
import socket
from collections.abc import Iterable, Sequence
from pathlib import Path

from twisted.logger import Logger

from shyped.core import audit
from shyped.core.audit import (
    GENESIS,
    Draft,
    Kind,
    Record,
    RecordError,
    format_denial,
    make_draft,
    parse_record,
    seal,
)
from shyped.core.auditverify import Anchor
from shyped.service.auditlog.files import (
    _first_seq,
    _fsync_dir,
    _LogFile,
    _write_all,
    decode_state,
    encode_state,
    list_log_files,
    split_lines,
)
from shyped.service.auditlog.rotation import (
    _Rotation,
)
from shyped.service.auditlog.settings import (
    DIR_MODE,
    STATE_NAME,
    STATE_SIZE,
    AuditLogBusy,
    AuditState,
    AuditUnavailable,
    DiskFullAction,
    log_file_name,
)
from shyped.service.auditlog.writerstate import (
    HeadDraft,
    _Outage,
    _Pending,
)

_log = Logger(namespace="shyped.audit")


class AuditLog(_Rotation):
    """The synchronous writer. Not thread-safe: one thread appends and flushes.

    `append` (or `record_decision` / `record_event`) seals records into the chain in memory;
    `flush` makes them durable (one write, one fdatasync, then the state file) and raises
    `AuditUnavailable` if it could not (fail-closed). `durable=False` skips the fsyncs, for
    benchmarks only.
    """

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

    def append(self, draft: Draft | HeadDraft) -> Record:
        """Seal `draft` into the chain (not yet durable: `flush`).

        Raises `AuditUnavailable` while fail-closed and a retry (at most one per
        ``retry_interval``) fails; the record is counted as refused.
        """
        self._require_open()
        if self._state is AuditState.UNAVAILABLE:
            due = self._monotonic() - self._last_attempt >= self.settings.retry_interval
            if not (due and self.try_resume()):
                self._refuse(draft.draft if isinstance(draft, HeadDraft) else draft)
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
        self._tell_listeners(state, reason)
