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
    #: Xen's FLASK (shyped.service.flaskxen): detected at start, a binary policy loaded or
    #: refused, a domain relabelled in Xen, AVC denials read from Xen's console ring (and a
    #: count of those not written in full).
    FLASK_STATE = "flask-state"
    FLASK_LOAD = "flask-load"
    FLASK_RELABEL = "flask-relabel"
    FLASK_AVC = "flask-avc"
    FLASK_AVC_REPEATS = "flask-avc-repeats"
    #: A domain that ran as an instance of a dynamic label is gone: its instance is released.
    INSTANCE_RELEASE = "instance-release"
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
    #: The instance a domain runs as under a dynamic label (``web#3f…``, `shyped.core.instances`).
    instance: str | None = None

    def to_json(self) -> dict[str, JsonValue]:
        out: dict[str, JsonValue] = {}
        for field in ("name", "domid", "uuid", "label", "resource", "instance"):
            v = getattr(self, field)
            if v is not None:
                out[field] = to_json_value(v)
        return out

    def describe(self) -> str:
        """``web(3)``, ``web(3 web#3f…)``, ``disk:/img/a.img`` or ``?`` for log lines."""
        if self.resource is not None:
            return self.resource
        who = self.name or (self.uuid or "?")
        inst = f" {self.instance}" if self.instance else ""
        return f"{who}({self.domid}{inst})" if self.domid is not None else who


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
    for name in ("name", "uuid", "label", "resource", "instance"):
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
        if p.instance is not None:
            parts.append(f"{prefix}instance={_kv(p.instance)}")
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
        return printable(line + str(b.get("reason", "")))
    rest = " ".join(f"{k}={_kv(v)}" for k, v in sorted(b.items()))
    return printable(f"{head} {record.kind} {rest}".rstrip())


def printable(text: str) -> str:
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
