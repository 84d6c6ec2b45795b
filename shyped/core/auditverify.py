"""Verifying an audit chain: every record well-formed, in sequence, linked by its hash to the
one before, and (with an `Anchor`) continuing what was last known. Pure: lines in, a
`VerifyReport` out; `shyped.service.auditlog` reads the files."""

from __future__ import annotations

import enum
from collections.abc import Iterable
from typing import Any

import attrs

from shyped.core.audit import (
    GENESIS,
    Kind,
    Record,
    RecordError,
    parse_record,
    seq_hint,
)


class Level(enum.StrEnum):
    """How bad a finding is: errors break the chain, warnings are documented losses."""

    ERROR = "error"
    WARNING = "warning"
    NOTICE = "notice"


@attrs.frozen
class Finding:
    """One thing `verify_chain` has to say, located by file, line and seq where known."""

    level: Level
    message: str
    source: str | None = None
    line: int | None = None
    seq: int | None = None

    @property
    def where(self) -> str:
        parts = []
        if self.source is not None:
            parts.append(self.source if self.line is None else f"{self.source}:{self.line}")
        if self.seq is not None:
            parts.append(f"seq {self.seq}")
        return " ".join(parts)

    def __str__(self) -> str:
        where = self.where
        return (
            f"{self.level}: {where}: {self.message}" if where else f"{self.level}: {self.message}"
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "level": str(self.level),
            "message": self.message,
            "file": self.source,
            "line": self.line,
            "seq": self.seq,
        }


@attrs.frozen
class Anchor:
    """A chain head known from outside the log files (the writer's state file)."""

    log: str
    seq: int
    hash: str
    file: str | None = None


@attrs.frozen
class VerifyReport:
    """The outcome of `verify_chain`."""

    findings: tuple[Finding, ...]
    files: int
    records: int
    log: str | None
    first_seq: int | None
    last_seq: int | None
    last_hash: str | None

    @property
    def ok(self) -> bool:
        return not self.errors

    @property
    def errors(self) -> tuple[Finding, ...]:
        return tuple(f for f in self.findings if f.level is Level.ERROR)

    @property
    def warnings(self) -> tuple[Finding, ...]:
        return tuple(f for f in self.findings if f.level is Level.WARNING)

    @property
    def first_error(self) -> Finding | None:
        errs = self.errors
        return errs[0] if errs else None

    def to_json(self) -> dict[str, Any]:
        first = self.first_error
        return {
            "ok": self.ok,
            "files": self.files,
            "records": self.records,
            "log": self.log,
            "first_seq": self.first_seq,
            "last_seq": self.last_seq,
            "last_hash": self.last_hash,
            "first_broken": first.to_json() if first else None,
            "findings": [f.to_json() for f in self.findings],
        }


@attrs.define
class _Pos:
    source: str
    line: int


class _Verifier:
    """The state of one verification pass (see `verify_chain`)."""

    def __init__(self, anchor: Anchor | None, complete: bool) -> None:
        self.anchor = anchor
        self.complete = complete
        self.findings: list[Finding] = []
        self.files = 0
        self.records = 0
        self.first: Record | None = None
        self.first_pos: _Pos | None = None
        self.last: Record | None = None
        self.last_pos: _Pos | None = None
        self.resync = False  # the previous line was unreadable: skip the next link check
        self.torn: Finding | None = None  # incomplete last line of the latest file so far
        self.retentions: list[Record] = []
        self.anchor_seen = False
        self.unlocated: int | None = None  # index of a damaged line's finding without a seq
        self.damaged_at: list[int] = []  # indexes of findings for damaged lines

    def add(self, level: Level, msg: str, pos: _Pos | None, seq: int | None) -> None:
        src, line = (pos.source, pos.line) if pos else (None, None)
        self.findings.append(Finding(level, msg, src, line, seq))

    def expected_seq(self) -> int | None:
        return self.last.seq + 1 if self.last is not None else None

    def begin_file(self, source: str) -> None:
        if self.torn is not None:  # a torn line with more files after it: not a crash tail
            self.findings.append(
                attrs.evolve(
                    self.torn,
                    level=Level.ERROR,
                    message=self.torn.message + "; more files follow it, so it is no crash tail",
                )
            )
            self.torn = None
        self.files += 1

    def damaged(self, pos: _Pos, raw: bytes, why: str) -> None:
        # Where the chain says it is; the line's own seq digits may be what was changed.
        seq = self.expected_seq() if not self.resync else None
        if seq is None:
            seq = seq_hint(raw)
        if not raw.endswith(b"\n"):
            self.torn = Finding(
                Level.WARNING,
                f"incomplete last line ({len(raw)} bytes): a write was interrupted; the writer "
                "quarantines it when it restarts",
                pos.source,
                pos.line,
                seq,
            )
            return
        self.add(Level.ERROR, f"unreadable record: {why}", pos, seq)
        self.damaged_at.append(len(self.findings) - 1)
        self.unlocated = len(self.findings) - 1 if seq is None else None
        self.resync = True

    def record(self, pos: _Pos, rec: Record) -> None:
        self.records += 1
        if self.unlocated is not None:  # the damaged line just before: it held seq - 1
            f = self.findings[self.unlocated]
            if f.source == pos.source and f.line == pos.line - 1 and rec.seq > 0:
                self.findings[self.unlocated] = attrs.evolve(f, seq=rec.seq - 1)
            self.unlocated = None
        last = self.last
        if last is None:
            self.first, self.first_pos = rec, pos
            if rec.seq == 0 and (rec.kind != Kind.LOG_START or rec.prev != GENESIS):
                self.add(
                    Level.ERROR,
                    "seq 0 must be the log-start record with the genesis prev",
                    pos,
                    rec.seq,
                )
        elif self.resync:
            self.add(
                Level.NOTICE,
                "chain check resumes here after the unreadable record(s) before",
                pos,
                rec.seq,
            )
        else:
            self.link(pos, last, rec)
        self.resync = False
        if rec.kind == Kind.LOG_START and last is not None:
            self.add(
                Level.ERROR,
                "log-start record in the middle of the log (logs spliced?)",
                pos,
                rec.seq,
            )
        if rec.kind == Kind.ROTATE and pos.line != 1:
            self.add(Level.ERROR, "rotate record in the middle of a file", pos, rec.seq)
        if pos.line == 1 and last is not None and rec.kind != Kind.ROTATE:
            self.add(
                Level.ERROR,
                f"file begins with a {rec.kind} record, not a rotate record "
                "(files split or joined?)",
                pos,
                rec.seq,
            )
        self.annotate(pos, rec)
        a = self.anchor
        if a is not None and rec.seq == a.seq and rec.log == a.log:
            self.anchor_seen = True
            if rec.hash != a.hash:
                self.add(
                    Level.ERROR,
                    f"record differs from the one the state file recorded (hash {a.hash[:16]}…)",
                    pos,
                    rec.seq,
                )
        self.last, self.last_pos = rec, pos

    def link(self, pos: _Pos, last: Record, rec: Record) -> None:
        if rec.log != last.log:
            self.add(
                Level.ERROR,
                f"record of another log (id {rec.log}, this log is {last.log})",
                pos,
                rec.seq,
            )
        elif rec.seq > last.seq + 1:
            n = rec.seq - last.seq - 1
            self.add(
                Level.ERROR,
                f"seq jumps from {last.seq} to {rec.seq}: {n} record(s) missing before this one",
                pos,
                rec.seq,
            )
        elif rec.seq <= last.seq:
            self.add(
                Level.ERROR,
                f"seq {rec.seq} after seq {last.seq}: records reordered or duplicated",
                pos,
                rec.seq,
            )
        elif rec.prev != last.hash:
            self.add(
                Level.ERROR,
                f"prev does not match the hash of seq {last.seq}: a record was replaced",
                pos,
                rec.seq,
            )

    def annotate(self, pos: _Pos, rec: Record) -> None:
        """Findings for the records that document losses."""
        b = rec.body
        if rec.kind == Kind.RETENTION:
            self.retentions.append(rec)
        elif rec.kind == Kind.LOG_START and "previous_log" in b:
            self.add(
                Level.WARNING,
                f"the log was started again: the files of log {b.get('previous_log')} (up to "
                f"seq {b.get('previous_seq')}, per its state file) were gone",
                pos,
                rec.seq,
            )
        elif rec.kind == Kind.LOG_RECOVERED:
            lost = b.get("lost_records", 0)
            torn = b.get("torn_bytes", 0)
            damaged = b.get("damaged_lines", 0)
            if isinstance(lost, int) and lost > 0:
                self.add(
                    Level.WARNING,
                    f"documented loss: at restart the writer found {lost} committed record(s) "
                    f"after seq {b.get('after_seq')} missing or damaged (state file "
                    f"{b.get('state', '?')}: it recorded seq {b.get('state_seq')})",
                    pos,
                    rec.seq,
                )
            elif b.get("state") not in (None, "ok", "behind"):
                self.add(
                    Level.WARNING,
                    f"writer restart: state file {b.get('state')}; truncation before this "
                    "point cannot be ruled out",
                    pos,
                    rec.seq,
                )
            if isinstance(damaged, int) and damaged > 0:
                self.add(
                    Level.WARNING,
                    f"writer restart quarantined {damaged} complete but damaged line(s) "
                    f"({torn} bytes) into {b.get('quarantine')}",
                    pos,
                    rec.seq,
                )
            elif isinstance(torn, int) and torn > 0:
                self.add(
                    Level.NOTICE,
                    f"writer restart quarantined an interrupted write ({torn} bytes, never "
                    f"acknowledged) into {b.get('quarantine')}",
                    pos,
                    rec.seq,
                )
        elif rec.kind == Kind.DAEMON_STOP and "head_seq" in b:
            named = (b.get("head_seq"), b.get("head_hash"))
            if named != (rec.seq - 1, rec.prev):
                self.add(
                    Level.WARNING,
                    f"daemon-stop names seq {named[0]} as the chain head, but follows seq "
                    f"{rec.seq - 1}: records were written after the head it claims (a daemon "
                    "that read the head before its last records reached the writer)",
                    pos,
                    rec.seq,
                )
        elif rec.kind == Kind.AUDIT_RESUMED:
            refused, lost = b.get("refused", 0), b.get("lost", 0)
            self.add(
                Level.WARNING,
                f"audit log was unavailable from {b.get('since')} ({b.get('error')}): "
                f"{refused} record(s) refused, {lost} lost",
                pos,
                rec.seq,
            )

    def finish(self) -> VerifyReport:
        first, last = self.first, self.last
        if self.torn is not None:  # the newest file's last line: a crash tail
            self.findings.append(self.torn)
        if first is None:
            level = Level.ERROR if self.complete else Level.NOTICE
            self.add(level, "no records", None, None)
        else:
            assert self.first_pos is not None and last is not None and self.last_pos is not None
            if first.seq > 0:
                self.check_start(first, self.first_pos)
            self.check_anchor(last, self.last_pos)
        return VerifyReport(
            findings=tuple(self.findings),
            files=self.files,
            records=self.records,
            log=first.log if first else None,
            first_seq=first.seq if first else None,
            last_seq=last.seq if last else None,
            last_hash=last.hash if last else None,
        )

    def check_start(self, first: Record, pos: _Pos) -> None:
        for r in self.retentions:
            if (
                r.body.get("removed_through_seq") == first.seq - 1
                and r.body.get("removed_last_hash") == first.prev
            ):
                self.add(
                    Level.NOTICE,
                    f"records 0..{first.seq - 1} were removed by retention "
                    f"(documented by seq {r.seq})",
                    pos,
                    first.seq,
                )
                return
        if self.complete:
            self.add(
                Level.ERROR,
                f"the log begins at seq {first.seq}: earlier records are missing and no "
                "retention record documents their removal",
                pos,
                first.seq,
            )
        else:
            self.add(
                Level.NOTICE,
                f"verification starts at seq {first.seq} (earlier files not given); its link "
                "to them is unchecked",
                pos,
                first.seq,
            )

    def check_anchor(self, last: Record, pos: _Pos) -> None:
        a = self.anchor
        if a is None:
            if self.complete:
                self.add(
                    Level.NOTICE,
                    "no usable state file: truncation of the newest file at a record boundary "
                    "cannot be detected",
                    None,
                    None,
                )
            return
        if a.log != last.log:
            self.add(
                Level.ERROR,
                f"the state file belongs to another log ({a.log}); this log is {last.log}",
                None,
                None,
            )
        elif a.seq > last.seq:
            damaged = {self.findings[i].seq for i in self.damaged_at}
            missing = [s for s in range(last.seq + 1, a.seq + 1) if s not in damaged]
            if not missing:  # they are there, damaged, and reported as such already
                return
            self.add(
                Level.ERROR,
                f"truncated: the state file records seq {a.seq} (hash {a.hash[:16]}…"
                f"{', in ' + a.file if a.file else ''}) as written, but the log ends at seq "
                f"{last.seq}: {len(missing)} record(s) missing at the end",
                _Pos(pos.source, pos.line + 1),
                last.seq + 1,
            )
        elif not self.anchor_seen:
            self.add(
                Level.NOTICE,
                f"the state file's seq {a.seq} is before the records given; not checked",
                None,
                a.seq,
            )
        elif a.seq < last.seq:
            self.add(
                Level.NOTICE,
                f"the state file lags the log by {last.seq - a.seq} record(s) (the writer "
                "stopped between writing the log and the state file)",
                None,
                a.seq,
            )


def verify_chain(
    files: Iterable[tuple[str, Iterable[bytes]]],
    *,
    anchor: Anchor | None = None,
    complete: bool = True,
) -> VerifyReport:
    """Check the chain over `files`, in order: (name, lines) with each line's ``\\n`` kept.

    `complete`: the files are the whole log as it should be (a directory), so a log that begins
    after seq 0 without a retention record saying why is an error; with ``False`` (a selection
    of files) it is a notice. `anchor`: the head the writer last recorded outside the log; with
    it, records missing at the end of the newest file are detected.
    """
    v = _Verifier(anchor, complete)
    for source, lines in files:
        v.begin_file(source)
        empty = True
        for lineno, raw in enumerate(lines, start=1):
            empty = False
            pos = _Pos(source, lineno)
            if v.torn is not None:  # can only happen with a caller that splits oddly
                v.findings.append(attrs.evolve(v.torn, level=Level.ERROR))
                v.torn = None
            try:
                rec = parse_record(raw)
            except RecordError as e:
                v.damaged(pos, raw, str(e))
                continue
            v.record(pos, rec)
        if empty:
            v.add(Level.NOTICE, "empty file", _Pos(source, 0), None)
    return v.finish()


def verify_lines(lines: Iterable[bytes], source: str = "<lines>", **kw: Any) -> VerifyReport:
    """`verify_chain` over a single file's lines."""
    return verify_chain([(source, lines)], **kw)
