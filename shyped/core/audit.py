"""Audit records and their hash chain: record -> canonical bytes -> hash, and verification.

Pure: no files, no clock, no reactor. `shyped.service.auditlog` is the edge that writes and reads
the files; this module decides what a record is, what its bytes are and whether a sequence of lines
is an intact chain.

A record is one JSON object on one line. Every record carries the header fields

    v     format version (1)
    log   the log's id: 32 random hex digits chosen when the log was started
    seq   sequence number, 0 for the first record of the log, +1 for each record after
    time  UTC wall-clock time of the event, ``YYYY-MM-DDTHH:MM:SS.ffffffZ``
    kind  what happened (`Kind`)
    prev  the ``hash`` of the previous record; `GENESIS` for the log's first record (seq 0)
    hash  sha256 (hex) of the canonical serialization of the record without ``hash``

plus fields of its kind (a decision's ``hook``, ``decision``, ``subject`` …). The canonical
serialization is JSON with sorted keys, no whitespace, UTF-8 (non-ASCII characters unescaped).
A line on disk is ``{"hash":"<64 hex>",`` followed by the canonical serialization of the record
without ``hash`` minus its opening ``{``, then ``\\n``: still one JSON object, and the hash
covers exactly the bytes stored after it, so a verifier hashes what is on disk (no
re-serialization) and any change to a byte of a line changes the hash or breaks the line's
form. Since every record names the hash of the one before and its own sequence number,
deleting, inserting or reordering records breaks the chain at the first record after the
change. The log id in every record keeps records of two logs from being spliced together.

What `verify_chain` can and cannot detect is spelled out in docs/audit.md; in short, a chain
is only as good as its anchors: truncation of the newest file at a record boundary is visible
only against something outside the file that knows the head (the writer's state file, passed
in as an `Anchor`), and a writer with root on the host can recompute any chain.
"""

from __future__ import annotations

import enum
import hashlib
import json
import math
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, Final, TypeAlias

import attrs

from shyped.policy.decisions import Decision

FORMAT_VERSION: Final = 1
#: ``prev`` of the log's first record.
GENESIS: Final = "0" * 64
#: Header fields, present in every record; everything else is the kind's body.
HEADER_FIELDS: Final = frozenset({"v", "log", "seq", "time", "kind", "prev", "hash"})
#: Longest string kept in a record; longer values (hostile input) are cut and marked.
MAX_TEXT: Final = 1024
#: Longest list kept in a record.
MAX_ITEMS: Final = 256

_HEX64 = re.compile(r"[0-9a-f]{64}")
_HEX64B = re.compile(rb"[0-9a-f]{64}")
_LOG_ID = re.compile(r"[0-9a-f]{32}")
_KIND = re.compile(r"[a-z][a-z0-9-]{0,39}")
_TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z")
_SEQ_HINT = re.compile(rb'"seq":(\d{1,18})[,}]')

JsonValue: TypeAlias = "bool | int | float | str | list[JsonValue] | dict[str, JsonValue] | None"


class Kind(enum.StrEnum):
    """What a record is about."""

    # Written by the daemon (through `record_decision` / `record_event`).
    DECISION = "decision"
    POLICY_LOAD = "policy-load"
    POLICY_REJECT = "policy-reject"
    MODE_CHANGE = "mode-change"
    RELABEL = "relabel"
    RESOURCE_LABEL = "resource-label"
    DAEMON_START = "daemon-start"
    DAEMON_STOP = "daemon-stop"
    RECONCILE = "reconcile"
    CONTROL = "control"  #: a change request on the control socket, done or refused
    #: Refusals of one uid in one interval beyond the first, counted (shyped.control.refusals).
    CONTROL_REFUSALS = "control-refusals"
    #: An attempt of a domain veto that failed or finally succeeded (shyped.service.vetoretry).
    VETO_RETRY = "veto-retry"
    #: Guest-paced decisions of one key in one interval beyond the burst, counted
    #: (shyped.service.daemon.GUEST_REPEAT_BURST).
    DECISION_REPEATS = "decision-repeats"
    # Written by the audit log itself.
    LOG_START = "log-start"
    ROTATE = "rotate"
    RETENTION = "retention"
    LOG_RECOVERED = "log-recovered"
    AUDIT_RESUMED = "audit-resumed"


#: Kinds only the audit log writes; callers may not forge them.
LOG_KINDS: Final = frozenset(
    {Kind.LOG_START, Kind.ROTATE, Kind.RETENTION, Kind.LOG_RECOVERED, Kind.AUDIT_RESUMED}
)


class RecordError(ValueError):
    """A line that is not a well-formed, self-consistent record (the message says why)."""


# ------------------------------------------------------------------------------- values


_time_cache: tuple[int, str] = (-1, "")


def format_time(timestamp: float) -> str:
    """The ``time`` field for a POSIX timestamp (UTC, microseconds)."""
    global _time_cache
    sec, us = divmod(round(timestamp * 1_000_000), 1_000_000)
    cached, text = _time_cache
    if sec != cached:  # strftime once per second, not once per record
        text = datetime.fromtimestamp(sec, UTC).strftime("%Y-%m-%dT%H:%M:%S")
        _time_cache = (sec, text)
    return f"{text}.{us:06d}Z"


def clean_text(text: str) -> str:
    """A string safe to store: valid UTF-8 (lone surrogates escaped), at most `MAX_TEXT` chars.

    Names, paths and reasons may carry bytes a guest chose; JSON escapes control characters,
    this makes sure encoding never fails and one value cannot bloat the log.
    """
    if not text.isascii():
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    if len(text) > MAX_TEXT:
        text = f"{text[:MAX_TEXT]}...[+{len(text) - MAX_TEXT} chars]"
    return text


def to_json_value(value: object) -> JsonValue:
    """`value` as plain JSON data; sets are sorted, enums give their value, text is cleaned.

    Raises TypeError for anything else (so a caller's mistake shows at the call, not in verify).
    """
    t = type(value)
    if t is str:  # the common case first, cheaply
        text = str(value)
        return text if len(text) <= MAX_TEXT and text.isascii() else clean_text(text)
    if value is None or t is int or t is bool:
        return value  # type: ignore[return-value]
    if isinstance(value, bool | int):
        return int(value)
    if isinstance(value, enum.Enum):
        return to_json_value(value.value)
    if isinstance(value, str):
        return clean_text(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise TypeError(f"audit values must be finite numbers, not {value!r}")
        return value
    if isinstance(value, Party):
        return value.to_json()
    if isinstance(value, Mapping):
        out: dict[str, JsonValue] = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise TypeError(f"audit mapping keys must be strings, not {k!r}")
            out[clean_text(k)] = to_json_value(v)
        return out
    if isinstance(value, set | frozenset):
        items = sorted(to_json_value(v) for v in value)  # type: ignore[type-var]
        return items[:MAX_ITEMS]
    if isinstance(value, list | tuple):
        return [to_json_value(v) for v in value[:MAX_ITEMS]]
    if hasattr(value, "__str__") and type(value).__str__ is not object.__str__:
        return clean_text(str(value))  # e.g. LabelRef, MlsLabel, Path
    raise TypeError(f"cannot store {type(value).__name__} in an audit record")


@attrs.frozen
class Party:
    """One side of a decision: a domain (name, domid, uuid, label) or a resource (id, label)."""

    name: str | None = None
    domid: int | None = None
    uuid: str | None = None
    label: str | None = None
    resource: str | None = None

    def to_json(self) -> dict[str, JsonValue]:
        out: dict[str, JsonValue] = {}
        for field in ("name", "domid", "uuid", "label", "resource"):
            v = getattr(self, field)
            if v is not None:
                out[field] = to_json_value(v)
        return out

    def describe(self) -> str:
        """``web(3)``, ``disk:/img/a.img`` or ``?`` for log lines."""
        if self.resource is not None:
            return self.resource
        who = self.name or (self.uuid or "?")
        return f"{who}({self.domid})" if self.domid is not None else who


# ------------------------------------------------------------------------------- records


@attrs.frozen
class Draft:
    """A record before it has a place in the chain: kind, time and the kind's fields."""

    kind: str
    time: str
    body: Mapping[str, JsonValue] = attrs.field(factory=dict)


@attrs.frozen
class Record:
    """A sealed record: its place in the chain, its fields and the exact line on disk."""

    log: str
    seq: int
    time: str
    kind: str
    prev: str
    hash: str
    body: Mapping[str, Any]
    line: bytes = attrs.field(repr=False, eq=False)

    def to_json(self) -> dict[str, Any]:
        """All fields, as in the line."""
        return json.loads(self.line)  # type: ignore[no-any-return]

    @property
    def denied(self) -> bool:
        return self.kind == Kind.DECISION and self.body.get("decision") == "deny"


def canonical_bytes(fields: Mapping[str, Any]) -> bytes:
    """The canonical serialization: sorted keys, no whitespace, UTF-8, no NaN/Infinity."""
    return json.dumps(
        fields, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")


def record_hash(fields: Mapping[str, Any]) -> str:
    """sha256 (hex) over the canonical serialization of `fields` without ``hash``."""
    return hashlib.sha256(
        canonical_bytes({k: v for k, v in fields.items() if k != "hash"})
    ).hexdigest()


def validate_kind(kind: str) -> str:
    if not isinstance(kind, str) or not _KIND.fullmatch(kind):
        raise ValueError(f"invalid audit record kind {kind!r} (lowercase words joined by '-')")
    return kind


def make_draft(kind: str, time: str, details: Mapping[str, object]) -> Draft:
    """A draft of `kind` with `details` as its body (converted by `to_json_value`)."""
    validate_kind(kind)
    clash = HEADER_FIELDS.intersection(details)
    if clash:
        raise ValueError(f"audit details may not set header field(s) {sorted(clash)}")
    body = to_json_value(dict(details))
    assert isinstance(body, dict)
    return Draft(kind, time, body)


def event_draft(kind: str | Kind, time: str, **details: object) -> Draft:
    """A daemon event (policy load, mode change …); the log's own kinds are refused."""
    if kind in LOG_KINDS:
        raise ValueError(f"record kind {kind!r} is written by the audit log itself")
    return make_draft(str(kind), time, details)


def decision_draft(
    decision: Decision,
    time: str,
    *,
    subject: Party,
    obj: Party | None = None,
    policy_sha256: str | None = None,
    mode: str | None = None,
    **details: object,
) -> Draft:
    """A ``decision`` record for `decision` between `subject` and `obj`.

    Parties without a label get the label name the decision was taken on.
    """
    if subject.label is None and decision.subject_label is not None:
        subject = attrs.evolve(subject, label=decision.subject_label)
    if obj is not None and obj.label is None and decision.object_label is not None:
        obj = attrs.evolve(obj, label=decision.object_label)
    fields: dict[str, object] = {
        "decision": decision.verdict,
        "hook": decision.hook,
        "rule": decision.rule,
        "reason": decision.reason,
        "subject": subject,
    }
    if obj is not None:
        fields["object"] = obj
    if policy_sha256 is not None:
        fields["policy_sha256"] = policy_sha256
    if mode is not None:
        fields["mode"] = mode
    if decision.ste_types:
        fields["ste_types"] = decision.ste_types
    if decision.cw_types:
        fields["cw_types"] = decision.cw_types
    if decision.conflict_set is not None:
        fields["conflict_set"] = decision.conflict_set
    if decision.mls:
        fields["mls"] = [str(m) for m in decision.mls]
    fields.update(details)
    return make_draft(Kind.DECISION, time, fields)


_PREFIX = b'{"hash":"'
_BODY_AT = len(_PREFIX) + 64 + 2  # after '{"hash":"<64 hex>",'


def seal(draft: Draft, *, log: str, seq: int, prev: str) -> Record:
    """`draft` placed at `seq` after the record whose hash is `prev`."""
    fields: dict[str, Any] = dict(draft.body)
    fields.update(v=FORMAT_VERSION, log=log, seq=seq, time=draft.time, kind=draft.kind, prev=prev)
    body = canonical_bytes(fields)  # b'{...}', never empty: the header is in it
    digest = hashlib.sha256(body).hexdigest()
    line = b"".join((_PREFIX, digest.encode("ascii"), b'",', body[1:], b"\n"))
    return Record(log, seq, draft.time, draft.kind, prev, digest, draft.body, line)


def parse_record(line: bytes) -> Record:
    """The record on `line` (with its ``\\n``), checked for form and its own hash.

    The hash is checked against the bytes as stored, before anything else: no byte of a
    record can change unnoticed. Only the record itself is checked here; its place in the chain
    is `verify_chain`'s job.
    """
    if not line.endswith(b"\n"):
        raise RecordError("incomplete line (no newline at the end)")
    stored = line[len(_PREFIX) : _BODY_AT - 2]
    if (
        not line.startswith(_PREFIX)
        or line[_BODY_AT - 2 : _BODY_AT] != b'",'
        or not _HEX64B.fullmatch(stored)
    ):
        raise RecordError('does not begin with {"hash":"<64 hex digits>",')
    body = b"{" + line[_BODY_AT:-1]
    digest = stored.decode("ascii")
    if hashlib.sha256(body).hexdigest() != digest:
        raise RecordError("hash mismatch: the record's content was changed")
    # The hash holds; what follows rejects records no writer of this format produces.
    try:
        fields = json.loads(body.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise RecordError(f"not UTF-8 ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise RecordError(f"not JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(fields, dict):
        raise RecordError("not a JSON object")
    missing = sorted((HEADER_FIELDS - {"hash"}) - fields.keys())
    if missing:
        raise RecordError(f"missing field(s) {', '.join(missing)}")
    if "hash" in fields:
        raise RecordError("a second hash field")
    v, log, seq, time, kind, prev = (fields[k] for k in ("v", "log", "seq", "time", "kind", "prev"))
    if v != FORMAT_VERSION or isinstance(v, bool):
        raise RecordError(f"unknown format version {v!r}")
    if not isinstance(log, str) or not _LOG_ID.fullmatch(log):
        raise RecordError(f"malformed log id {log!r}")
    if not isinstance(seq, int) or isinstance(seq, bool) or seq < 0:
        raise RecordError(f"malformed seq {seq!r}")
    if not isinstance(time, str) or not _TIME.fullmatch(time):
        raise RecordError(f"malformed time {time!r}")
    if not isinstance(kind, str) or not _KIND.fullmatch(kind):
        raise RecordError(f"malformed kind {kind!r}")
    if not isinstance(prev, str) or not _HEX64.fullmatch(prev):
        raise RecordError(f"malformed prev {prev!r}")
    rest = {k: val for k, val in fields.items() if k not in HEADER_FIELDS}
    return Record(log, seq, time, kind, prev, digest, rest, line)


def seq_hint(line: bytes) -> int | None:
    """The ``seq`` a damaged line probably had, to locate it; None if it cannot be told."""
    m = _SEQ_HINT.search(line)
    return int(m.group(1)) if m else None


# ------------------------------------------------------------------------------- verify


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


# ------------------------------------------------------------------------------- output


def _kv(value: object) -> str:
    """A value for a ``key=value`` log line: bare if plain, JSON-quoted otherwise."""
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=True)
    if text and all(c.isascii() and c.isprintable() and c not in ' "=\\{}' for c in text):
        return text
    return json.dumps(text, ensure_ascii=True)


def _party(body: Mapping[str, Any], key: str) -> Party:
    raw = body.get(key)
    if not isinstance(raw, Mapping):
        return Party()
    kw: dict[str, Any] = {}
    for name in ("name", "uuid", "label", "resource"):
        if isinstance(raw.get(name), str):
            kw[name] = raw[name]
    if isinstance(raw.get("domid"), int):
        kw["domid"] = raw["domid"]
    return Party(**kw)


def format_denial(record: Record) -> str:
    """One greppable line for a denial, in the style of an SELinux AVC denial::

        shyped: denied { evtchn } for scontext=ACM:hosting:web tcontext=ACM:hosting:db ...

    Every value that is not a plain token is JSON-quoted, so a hostile name cannot forge fields
    or lines.
    """
    b = record.body
    subj, obj = _party(b, "subject"), _party(b, "object")
    parts = [f"shyped: denied {{ {_kv(b.get('hook', '?'))} }} for"]
    parts.append(f"scontext={_kv(subj.label or 'unlabelled')}")
    if obj != Party() or "object" in b:
        parts.append(f"tcontext={_kv(obj.label or 'unlabelled')}")
    for prefix, p in (("s", subj), ("t", obj)):
        if p.name is not None:
            parts.append(f"{prefix}name={_kv(p.name)}")
        if p.domid is not None:
            parts.append(f"{prefix}domid={p.domid}")
        if p.resource is not None:
            parts.append(f"{prefix}resource={_kv(p.resource)}")
    for key in ("rule", "mode"):
        if key in b:
            parts.append(f"{key}={_kv(b[key])}")
    parts.append(f"reason={_kv(b.get('reason', ''))}")
    parts.append(f"seq={record.seq}")
    return " ".join(parts)


def format_human(record: Record) -> str:
    """One line for `shypectl audit tail`."""
    b = record.body
    head = f"{record.time} #{record.seq}"
    if record.kind == Kind.DECISION:
        subj, obj = _party(b, "subject"), _party(b, "object")
        who = subj.describe() + (f" -> {obj.describe()}" if "object" in b else "")
        verdict = str(b.get("decision", "?")).upper()
        line = f"{head} {verdict} {b.get('hook', '?')} [{b.get('rule', '?')}] {who}: "
        return _printable(line + str(b.get("reason", "")))
    rest = " ".join(f"{k}={_kv(v)}" for k, v in sorted(b.items()))
    return _printable(f"{head} {record.kind} {rest}".rstrip())


def _printable(text: str) -> str:
    """`text` with control characters escaped (a terminal line, not an escape sequence)."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def iter_parsed(lines: Iterable[bytes]) -> Iterator[Record]:
    """The well-formed records among `lines` (for display; damaged lines are skipped)."""
    for raw in lines:
        try:
            yield parse_record(raw)
        except RecordError:
            continue


def last_records(records: Sequence[Record], n: int, denied_only: bool) -> list[Record]:
    """The last `n` records (denials only if asked)."""
    chosen = [r for r in records if r.denied] if denied_only else list(records)
    return chosen[-n:] if n > 0 else []
