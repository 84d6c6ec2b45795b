"""Sealing records into the chain, rotating to a new file at the size limit, and retention."""

from __future__ import annotations

from twisted.logger import Logger

from shyped.core.audit import (
    Draft,
    Kind,
    Record,
    RecordError,
    make_draft,
    parse_record,
    seal,
)
from shyped.service.auditlog.files import (
    _LogFile,
)
from shyped.service.auditlog.settings import (
    log_file_name,
)
from shyped.service.auditlog.writerstate import (
    HeadDraft,
    _Pending,
    _WriterState,
)

_log = Logger(namespace="shyped.audit")


class _Rotation(_WriterState):
    """Sealing, rotation and retention of the writer (no I/O until `flush` writes)."""

    # ----------------------------------------------------------------- sealing

    def _seal(self, draft: Draft | HeadDraft, *, counted: bool) -> Record:
        new_file = False
        if not self._pend_has_file:  # the log's very first record opens its first file
            new_file = True
        elif self._pend_size >= self.settings.max_file_bytes and self._pend_records > 0:
            self._seal_rotate()
        if isinstance(draft, HeadDraft):
            draft = draft.at(self._pend_seq - 1, self._pend_hash)
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
