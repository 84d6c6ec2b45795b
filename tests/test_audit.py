"""The pure audit core: canonical records, the hash chain and what `verify_chain` detects."""

from __future__ import annotations

import hashlib
import json
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shyped.core import audit, auditverify
from shyped.core.audit import (
    GENESIS,
    Kind,
    Party,
    RecordError,
    decision_draft,
    event_draft,
    format_denial,
    format_human,
    make_draft,
    parse_record,
    seal,
)
from shyped.core.auditverify import Anchor, verify_chain, verify_lines
from shyped.policy.decisions import Decision, Hook, Rule

LOG = "0123456789abcdef0123456789abcdef"
T0 = "2024-05-01T12:00:00.000000Z"
DENY = Decision(False, Hook.EVTCHN, Rule.STE, "'web' and 'db' share no STE type", "web", "db")
PERMIT = Decision(True, Hook.DOMAIN_ADMIT, Rule.CHINESE_WALL, "no conflict", "web")


def chain(n: int, log: str = LOG, start: int = 0, prev: str = GENESIS) -> list[bytes]:
    """`n` sealed lines: a log-start (when `start` is 0) and alternating decisions/events."""
    lines: list[bytes] = []
    for seq in range(start, start + n):
        if seq == 0:
            draft = make_draft(Kind.LOG_START, T0, {"format": 1})
        elif seq % 2:
            draft = decision_draft(
                DENY,
                T0,
                subject=Party("web", 3, "uuid-web"),
                obj=Party("db", 5, "uuid-db"),
                policy_sha256="ab" * 32,
                mode="enforcing",
            )
        else:
            draft = event_draft(Kind.POLICY_LOAD, T0, name="hosting", version=f"1.{seq}")
        rec = seal(draft, log=log, seq=seq, prev=prev)
        lines.append(rec.line)
        prev = rec.hash
    return lines


def errors(report: auditverify.VerifyReport) -> list[auditverify.Finding]:
    return list(report.errors)


# ------------------------------------------------------------------------------ records


def test_line_is_the_hash_then_the_canonical_json_it_covers() -> None:
    rec = seal(event_draft("mode-change", T0, mode="permissive"), log=LOG, seq=7, prev=GENESIS)
    fields = json.loads(rec.line)  # still one JSON object
    without = {k: v for k, v in fields.items() if k != "hash"}
    canon = json.dumps(without, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    digest = hashlib.sha256(canon.encode()).hexdigest()
    assert fields["hash"] == rec.hash == digest == audit.record_hash(fields)
    assert rec.line == f'{{"hash":"{digest}",{canon[1:]}\n'.encode()
    assert (fields["seq"], fields["prev"], fields["log"], fields["kind"]) == (
        7,
        GENESIS,
        LOG,
        "mode-change",
    )
    assert parse_record(rec.line) == rec


def test_decision_record_names_both_domains_labels_policy_and_reason() -> None:
    draft = decision_draft(
        DENY,
        T0,
        subject=Party("web", 3, "u-1"),
        obj=Party("db", 5, "u-2", label="ACM:hosting:db"),
        policy_sha256="cd" * 32,
        mode="enforcing",
        port=17,
    )
    body = seal(draft, log=LOG, seq=1, prev=GENESIS).to_json()
    assert body["decision"] == "deny" and body["hook"] == "evtchn" and body["rule"] == "ste"
    assert body["subject"] == {"name": "web", "domid": 3, "uuid": "u-1", "label": "web"}
    assert body["object"]["label"] == "ACM:hosting:db"  # an explicit label wins
    assert body["reason"] == DENY.reason and body["policy_sha256"] == "cd" * 32
    assert body["port"] == 17


def test_non_ascii_is_stored_as_utf8_and_hostile_text_is_bounded() -> None:
    name = "wéb-\udcff" + "x" * 5000  # a lone surrogate (undecodable guest bytes), huge
    rec = seal(event_draft("relabel", T0, name=name), log=LOG, seq=1, prev=GENESIS)
    assert "é".encode() in rec.line
    stored = parse_record(rec.line).body["name"]
    assert stored.startswith("wéb-\\udcff") and len(stored) < 1100 and "chars]" in stored


@pytest.mark.parametrize(
    ("kind", "details", "message"),
    [
        ("log-start", {}, "written by the audit log"),
        ("audit-resumed", {}, "written by the audit log"),
        ("Bad Kind", {}, "invalid audit record kind"),
        ("relabel", {"seq": 3}, "header field"),
        ("relabel", {"x": float("nan")}, "finite"),
        ("relabel", {"x": object()}, "cannot store"),
        ("relabel", {"x": {1: 2}}, "keys must be strings"),
    ],
)
def test_bad_events_are_refused_at_the_call(
    kind: str, details: dict[str, object], message: str
) -> None:
    with pytest.raises((ValueError, TypeError), match=message):
        event_draft(kind, T0, **details)


def forge(body: bytes) -> bytes:
    """A line whose hash is right for `body` (what only a forger with the format would make)."""
    return b'{"hash":"' + hashlib.sha256(body).hexdigest().encode() + b'",' + body[1:] + b"\n"


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (b'{"v":1}', "incomplete line"),
        (b'{"v":1}\n', "does not begin with"),
        (forge(b'{"x":"\xff"}'), "not UTF-8"),
        (forge(b"{,}"), "not JSON"),
        (forge(b'{"v":1}'), "missing field"),
        (forge(b'{"hash":"x","kind":"a","log":"l","prev":"p","seq":1,"time":"t","v":1}'), "second"),
    ],
)
def test_parse_rejects_malformed_lines(line: bytes, message: str) -> None:
    with pytest.raises(RecordError, match=message):
        parse_record(line)


def test_parse_rejects_whitespace_and_key_order_changes() -> None:
    line = chain(2)[1]
    fields = json.loads(line)
    pretty = json.dumps(fields, sort_keys=True).encode() + b"\n"  # ", " and ": "
    with pytest.raises(RecordError, match="does not begin"):
        parse_record(pretty)
    with pytest.raises(RecordError, match="hash mismatch"):
        parse_record(line[:75] + b" " + line[75:])  # one space the JSON would not mind
    reordered = json.dumps(dict(reversed(fields.items())), separators=(",", ":")).encode()
    with pytest.raises(RecordError, match="does not begin"):
        parse_record(reordered + b"\n")
    head, rest = line[:75], json.loads(b"{" + line[75:])
    shuffled = json.dumps(dict(reversed(rest.items())), separators=(",", ":")).encode()
    with pytest.raises(RecordError, match="hash mismatch"):
        parse_record(head + shuffled[1:] + b"\n")


# ------------------------------------------------------------------------------ verify


def test_intact_chain_verifies() -> None:
    lines = chain(6)
    last = parse_record(lines[-1])
    report = verify_lines(lines, "a.jsonl", anchor=Anchor(LOG, 5, last.hash))
    assert report.ok and report.records == 6 and (report.first_seq, report.last_seq) == (0, 5)
    assert report.last_hash == last.hash and report.log == LOG
    assert not report.warnings


@pytest.mark.parametrize("named_back", [0, 2])
def test_a_stop_record_that_names_another_chain_head_is_flagged(named_back: int) -> None:
    """``daemon-stop`` names the head it follows; one naming an older head (records written
    after it, which a stop that read the head too early produced) is a warning."""
    lines = chain(5)
    last = parse_record(lines[-1])
    named = parse_record(lines[-1 - named_back])
    stop = event_draft(Kind.DAEMON_STOP, T0, head_seq=named.seq, head_hash=named.hash)
    lines.append(seal(stop, log=LOG, seq=last.seq + 1, prev=last.hash).line)
    report = verify_lines(lines, "a.jsonl")
    assert report.ok
    flagged = [f for f in report.warnings if "daemon-stop names" in f.message]
    assert [(f.seq, f.message.split(",")[0]) for f in flagged] == (
        [] if named_back == 0 else [(5, "daemon-stop names seq 2 as the chain head")]
    )


def lines_of(data: bytes) -> list[bytes]:
    """Lines as the log reader cuts them: after each newline byte, and nowhere else."""
    parts = data.split(b"\n")
    return [p + b"\n" for p in parts[:-1]] + ([parts[-1]] if parts[-1] else [])


@pytest.mark.parametrize("with_anchor", [True, False])
def test_every_single_byte_change_is_detected_and_located(with_anchor: bool) -> None:
    lines = chain(4)
    head = parse_record(lines[-1])
    anchor = Anchor(LOG, head.seq, head.hash) if with_anchor else None
    data = b"".join(lines)
    starts = [sum(len(x) for x in lines[:i]) for i in range(len(lines))]
    for pos in range(len(data)):
        for new in {data[pos] ^ 0x01, data[pos] ^ 0x20, ord("0") if data[pos] != 48 else 49}:
            changed = bytearray(data)
            changed[pos] = new
            report = verify_lines(lines_of(bytes(changed)), "f.jsonl", anchor=anchor)
            line_no = max(i for i, s in enumerate(starts) if s <= pos) + 1
            if not with_anchor and pos == len(data) - 1:
                # The final newline: indistinguishable from a crash in the middle of a write
                # unless something outside the file knows the head.
                assert report.ok and report.warnings[0].line == 4
                continue
            assert not report.ok, f"byte {pos} -> {new!r} not detected"
            first = report.first_error
            assert first is not None and first.source == "f.jsonl"
            # Located at the changed line, or (a changed newline joins two lines) at the next.
            assert first.line in (line_no, line_no + 1), (pos, first)
            assert first.seq in (line_no - 1, line_no), (pos, first)


def test_deleted_record_is_located_at_the_record_after_the_gap() -> None:
    lines = chain(6)
    del lines[3]
    report = verify_lines(lines, "f.jsonl")
    (err,) = errors(report)
    assert (err.line, err.seq) == (4, 4) and "1 record(s) missing" in err.message


def test_reordered_records_are_detected() -> None:
    lines = chain(6)
    lines[2], lines[3] = lines[3], lines[2]
    report = verify_lines(lines, "f.jsonl")
    first = report.first_error
    assert first is not None and (first.line, first.seq) == (3, 3)
    assert any("reordered" in e.message for e in report.errors)


def test_replaced_record_with_valid_own_hash_breaks_the_link() -> None:
    lines = chain(5)
    old = parse_record(lines[2])
    forged = seal(event_draft("policy-load", T0, name="evil"), log=LOG, seq=2, prev=old.prev)
    lines[2] = forged.line  # self-consistent, but the next record names the old hash
    report = verify_lines(lines, "f.jsonl")
    (err,) = errors(report)
    assert (err.line, err.seq) == (4, 3) and "prev does not match" in err.message


def test_records_of_another_log_cannot_be_spliced_in() -> None:
    mine, other = chain(4), chain(4, log="f" * 32)
    report = verify_lines([*mine, *other[1:]], "f.jsonl")
    assert report.first_error is not None and "another log" in report.first_error.message
    # Even a whole other log appended after this one (its own log-start) is caught.
    report = verify_lines([*mine, *other], "f.jsonl")
    assert not report.ok


def test_torn_last_line_is_a_crash_tail_but_flagged_when_more_follows() -> None:
    lines = chain(4)
    torn = [*lines[:3], lines[3][:40]]
    report = verify_lines(torn, "f.jsonl")
    assert report.ok and report.last_seq == 2  # verifies up to the last complete record
    (warn,) = report.warnings
    assert warn.line == 4 and "incomplete last line" in warn.message
    # The same torn line in a file that is not the newest is an error.
    report = verify_chain([("a.jsonl", torn), ("b.jsonl", [])])
    assert not report.ok and report.first_error is not None
    assert report.first_error.source == "a.jsonl"


def test_truncation_at_a_record_boundary_needs_the_anchor() -> None:
    lines = chain(6)
    head = parse_record(lines[-1])
    cut = lines[:4]
    # Without anything outside the file knowing the head, a clean cut is undetectable …
    report = verify_lines(cut, "f.jsonl")
    assert report.ok
    assert any("cannot be detected" in f.message for f in report.findings)
    # … with the state file's anchor it is found and located after the last record.
    report = verify_lines(cut, "f.jsonl", anchor=Anchor(LOG, head.seq, head.hash, "f.jsonl"))
    err = report.first_error
    assert err is not None and "truncated" in err.message and "2 record(s)" in err.message
    assert (err.source, err.line, err.seq) == ("f.jsonl", 5, 4)


def test_anchor_hash_mismatch_and_lag() -> None:
    lines = chain(6)
    rec3 = parse_record(lines[3])
    report = verify_lines(lines, "f.jsonl", anchor=Anchor(LOG, 3, "1" * 64))
    assert report.first_error is not None and report.first_error.seq == 3
    report = verify_lines(lines, "f.jsonl", anchor=Anchor(LOG, 3, rec3.hash))
    assert report.ok and any("lags" in f.message for f in report.findings)
    report = verify_lines(lines, "f.jsonl", anchor=Anchor("e" * 32, 5, "1" * 64))
    assert not report.ok and "another log" in str(report.first_error)


def test_files_must_join_with_a_rotate_record() -> None:
    lines = chain(6)
    # Split a file in two without a rotate record: the second file's first record is flagged.
    report = verify_chain([("a.jsonl", lines[:3]), ("b.jsonl", lines[3:])])
    err = report.first_error
    assert err is not None and (err.source, err.line, err.seq) == ("b.jsonl", 1, 3)
    assert "not a rotate record" in err.message


def test_log_starting_late_is_an_error_unless_retention_documents_it() -> None:
    lines = chain(6)
    late = lines[3:]
    assert not verify_lines(late, "f.jsonl", complete=True).ok
    partial = verify_lines(late, "f.jsonl", complete=False)
    assert partial.ok and "earlier files not given" in partial.findings[0].message
    removed_last = parse_record(lines[2])
    retention = seal(
        make_draft(
            Kind.RETENTION,
            T0,
            {"removed": ["x"], "removed_through_seq": 2, "removed_last_hash": removed_last.hash},
        ),
        log=LOG,
        seq=6,
        prev=parse_record(lines[-1]).hash,
    )
    report = verify_lines([*late, retention.line], "f.jsonl", complete=True)
    assert report.ok and "removed by retention" in report.findings[0].message


def test_unreadable_line_is_located_by_its_seq_and_checking_resumes() -> None:
    lines = chain(6)
    lines[2] = b"garbage" + lines[2]
    report = verify_lines(lines, "f.jsonl")
    (err,) = report.errors
    assert (err.line, err.seq) == (3, 2) and "does not begin with" in err.message
    assert "chain check resumes" in report.findings[1].message


# ------------------------------------------------------------------------------ output


def _denial(name: str, reason: str) -> audit.Record:
    draft = decision_draft(
        Decision(False, Hook.EVTCHN, Rule.STE, reason),
        T0,
        subject=Party(name, 3, label="ACM:hosting:web"),
        obj=Party("db", 5, label="ACM:hosting:db"),
        mode="enforcing",
    )
    return seal(draft, log=LOG, seq=42, prev=GENESIS)


def test_denial_line_reads_like_an_avc_denial() -> None:
    line = format_denial(_denial("web", "'web' and 'db' share no STE type"))
    assert line == (
        "shyped: denied { evtchn } for scontext=ACM:hosting:web tcontext=ACM:hosting:db "
        "sname=web sdomid=3 tname=db tdomid=5 rule=ste mode=enforcing "
        "reason=\"'web' and 'db' share no STE type\" seq=42"
    )


_FIELD = re.compile(r' ([a-z]+)=("(?:[^"\\]|\\.)*"|[^ "]+)')


@settings(max_examples=300, deadline=None)
@given(name=st.text(min_size=1, max_size=40), reason=st.text(max_size=60))
def test_hostile_names_cannot_forge_fields_or_lines(name: str, reason: str) -> None:
    line = format_denial(_denial(name, reason))
    assert line.isprintable() and line.isascii()
    prefix = "shyped: denied { evtchn } for"
    assert line.startswith(prefix)
    fields = _FIELD.findall(line[len(prefix) :])
    # The whole line is exactly these fields, in this order: nothing forged, nothing lost.
    assert "".join(f" {k}={v}" for k, v in fields) == line[len(prefix) :]
    keys = [k for k, _ in fields]
    assert keys == [
        "scontext", "tcontext", "sname", "sdomid", "tname", "tdomid", "rule", "mode", "reason",
        "seq",
    ]  # fmt: skip
    values = {k: json.loads(v) if v.startswith('"') else v for k, v in fields}
    assert values["sname"] == audit.clean_text(name)
    assert values["reason"] == audit.clean_text(reason)


def test_human_line_escapes_control_characters() -> None:
    rec = _denial("web\n2024-01-01 #1 PERMIT", "x\x1b[31m")
    text = format_human(rec)
    assert "\n" not in text and "\x1b" not in text and text.startswith(f"{T0} #42 DENY evtchn")
    ev = seal(event_draft("mode-change", T0, mode="permissive"), log=LOG, seq=1, prev=GENESIS)
    assert format_human(ev) == f"{T0} #1 mode-change mode=permissive"


def test_permit_decision_is_not_a_denial() -> None:
    rec = seal(decision_draft(PERMIT, T0, subject=Party("web", 3)), log=LOG, seq=1, prev=GENESIS)
    assert not rec.denied and "PERMIT domain-admit" in format_human(rec)
