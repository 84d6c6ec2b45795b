"""The audit log on disk: durability, rotation, retention, restart recovery, reading."""

from __future__ import annotations

import grp
import itertools
import json
import os
import stat
from pathlib import Path

import pytest
from audit_helpers import DENY, ListMirror, feed, file_records, small
from prometheus_client import CollectorRegistry, generate_latest

from shyped.core.audit import Kind, parse_record
from shyped.core.auditverify import Level
from shyped.service.auditlog import (
    STATE_NAME,
    AuditCollector,
    AuditLog,
    AuditLogBusy,
    AuditSettings,
    Follower,
    list_log_files,
    read_state,
    tail_records,
    verify_directory,
    verify_files,
)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_new_log_creates_private_directory_and_files(tmp_path: Path) -> None:
    d = tmp_path / "var" / "audit"
    with AuditLog(small(d)) as log:
        feed(log, 3)
    assert mode(d) == 0o750
    files = list_log_files(d)
    assert [p.name for p in files] == ["audit-000000000000.jsonl"]
    assert mode(files[0]) == 0o600 and mode(d / STATE_NAME) == 0o600


def test_read_group_gets_0640_group_owned_files(tmp_path: Path) -> None:
    group = next((g for g in grp.getgrall() if g.gr_gid != 0), None)
    if group is None:
        pytest.skip("no non-root group on this system")
    with AuditLog(small(tmp_path / "a", group=group.gr_name)) as log:
        feed(log, 1)
    for p in [*list_log_files(tmp_path / "a"), tmp_path / "a" / STATE_NAME]:
        assert mode(p) == 0o640 and p.stat().st_gid == group.gr_gid
    assert (tmp_path / "a").stat().st_gid == group.gr_gid


def test_unknown_group_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="audit group 'no-such-group-xyz' does not exist"):
        AuditLog(small(tmp_path, group="no-such-group-xyz")).open()


@pytest.mark.parametrize(
    ("kw", "message"), [({"max_file_bytes": 10}, "at least 1024"), ({"keep_files": -1}, "0")]
)
def test_bad_settings_are_refused(tmp_path: Path, kw: dict[str, int], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        AuditSettings(directory=tmp_path, **kw)  # type: ignore[arg-type]


def test_records_reach_the_file_only_at_flush_and_chain_from_genesis(tmp_path: Path) -> None:
    with AuditLog(small(tmp_path)) as log:
        log.record_event("daemon-start", version="0.1.0")
        assert len(file_records(tmp_path)) == 1  # the log-start alone: not flushed yet
        assert log.pending == 1
        log.flush()
        recs = feed(log, 5)
        head = log.head
    on_disk = file_records(tmp_path)
    assert [r["seq"] for r in on_disk] == list(range(7))
    assert on_disk[0]["kind"] == "log-start" and on_disk[0]["prev"] == "0" * 64
    assert on_disk[1]["kind"] == "daemon-start"
    assert all(a["hash"] == b["prev"] for a, b in itertools.pairwise(on_disk))
    assert {r["log"] for r in on_disk} == {recs[0].log}
    anchor, status = read_state(tmp_path / STATE_NAME)
    assert status == "ok" and anchor is not None and (anchor.seq, anchor.hash) == head
    report, _ = verify_directory(tmp_path)
    assert report.ok and not report.warnings and report.records == 7


def test_denial_on_disk_has_every_field_the_issue_names(tmp_path: Path) -> None:
    with AuditLog(small(tmp_path)) as log:
        feed(log, 1)
    rec = file_records(tmp_path)[1]
    assert set(rec) >= {"time", "seq", "subject", "object", "hook", "decision", "reason"}
    assert {"policy_sha256", "prev", "hash"} <= set(rec)
    assert rec["subject"] == {
        "name": "web",
        "domid": 3,
        "uuid": "11111111-2222-3333-4444-555555555555",
        "label": "web",
    }


def test_rotation_keeps_the_chain_across_files(tmp_path: Path) -> None:
    with AuditLog(small(tmp_path, max_file_bytes=2048, keep_files=0)) as log:
        feed(log, 40, flush_every=3)
        assert log.stats.rotations >= 3
    files = list_log_files(tmp_path)
    assert len(files) >= 4
    last_hash = None
    for path in files:
        lines = path.read_bytes().splitlines(keepends=True)
        first = parse_record(lines[0])
        assert path.name == f"audit-{first.seq:012d}.jsonl"
        if last_hash is not None:  # the first record names the previous file's last hash
            assert first.kind == Kind.ROTATE and first.prev == last_hash
        last_hash = parse_record(lines[-1]).hash
    report, _ = verify_directory(tmp_path)
    assert report.ok and report.files == len(files) and report.first_seq == 0
    # A selection of files verifies too; the missing start is a notice, not an error.
    partial = verify_files(files[1:])
    assert partial.ok and partial.findings[0].level is Level.NOTICE


def test_retention_keeps_n_files_and_documents_what_it_removed(tmp_path: Path) -> None:
    with AuditLog(small(tmp_path, max_file_bytes=2048, keep_files=2)) as log:
        feed(log, 60, flush_every=2)
        assert log.stats.files_removed >= 2
    files = list_log_files(tmp_path)
    assert len(files) == 2
    report, _ = verify_directory(tmp_path)
    assert report.ok and report.first_seq is not None and report.first_seq > 0
    assert any("removed by retention" in f.message for f in report.findings)
    # Removing the oldest remaining file by hand is not retention: the gap is an error.
    files[0].unlink()
    report, _ = verify_directory(tmp_path)
    assert not report.ok and report.first_error is not None
    assert "no retention record" in report.first_error.message


def test_removing_or_cutting_a_middle_file_is_located(tmp_path: Path) -> None:
    with AuditLog(small(tmp_path, max_file_bytes=2048, keep_files=0)) as log:
        feed(log, 40, flush_every=3)
    files = list_log_files(tmp_path)
    # Cut the last record of the second file at its boundary.
    lines = files[1].read_bytes().splitlines(keepends=True)
    files[1].write_bytes(b"".join(lines[:-1]))
    cut_seq = parse_record(lines[-1]).seq
    report, _ = verify_directory(tmp_path)
    err = report.first_error
    assert err is not None and (err.source, err.line, err.seq) == (files[2].name, 1, cut_seq + 1)
    assert "1 record(s) missing" in err.message
    # A whole middle file gone.
    files[1].write_bytes(b"".join(lines))
    assert verify_directory(tmp_path)[0].ok
    files[1].unlink()
    err = verify_directory(tmp_path)[0].first_error
    assert err is not None and err.source == files[2].name and "missing" in err.message


def test_cutting_the_newest_file_at_a_record_boundary_is_found_by_the_state_file(
    tmp_path: Path,
) -> None:
    with AuditLog(small(tmp_path)) as log:
        feed(log, 6)
    path = list_log_files(tmp_path)[-1]
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(b"".join(lines[:-2]))
    report, status = verify_directory(tmp_path)
    err = report.first_error
    assert status == "ok" and err is not None and "truncated" in err.message
    assert (err.source, err.line, err.seq) == (path.name, 6, 5)
    # Without the state file the same cut is invisible; verify says it cannot tell.
    (tmp_path / STATE_NAME).unlink()
    report, status = verify_directory(tmp_path)
    assert status == "missing" and report.ok
    assert any("cannot be detected" in f.message for f in report.findings)


def test_clean_restart_continues_the_same_chain(tmp_path: Path) -> None:
    with AuditLog(small(tmp_path)) as log:
        feed(log, 4)
        log_id, (seq, _) = log.log_id, log.head
    with AuditLog(small(tmp_path)) as log:
        assert log.log_id == log_id and log.head[0] == seq and log.stats.recoveries == 0
        feed(log, 2)
    kinds = [r["kind"] for r in file_records(tmp_path)]
    assert "log-recovered" not in kinds and kinds.count("log-start") == 1
    report, _ = verify_directory(tmp_path)
    assert report.ok and not report.warnings and report.last_seq == seq + 2


def test_a_second_writer_is_refused(tmp_path: Path) -> None:
    with AuditLog(small(tmp_path)), pytest.raises(AuditLogBusy, match="in use"):
        AuditLog(small(tmp_path)).open()


def test_interrupted_write_is_quarantined_and_documented_at_restart(tmp_path: Path) -> None:
    with AuditLog(small(tmp_path)) as log:
        recs = feed(log, 4)
    path = list_log_files(tmp_path)[-1]
    torn = b'{"decision":"deny","hook":"evtchn","kind":"deci'
    with path.open("ab") as f:  # what a write cut short by a crash leaves
        f.write(torn)
    report, _ = verify_directory(tmp_path)
    assert report.ok and report.last_seq == recs[-1].seq  # verifies up to the last record
    assert "incomplete last line" in report.warnings[0].message
    with AuditLog(small(tmp_path)) as log:
        assert log.stats.recoveries == 1
        feed(log, 2)
    on_disk = file_records(tmp_path)
    rec = on_disk[recs[-1].seq + 1]
    assert rec["kind"] == "log-recovered" and rec["torn_bytes"] == len(torn)
    assert rec["after_seq"] == recs[-1].seq and rec["damaged_lines"] == 0
    assert (tmp_path / str(rec["quarantine"])).read_bytes() == torn
    report, _ = verify_directory(tmp_path)
    assert report.ok and not report.warnings
    assert any("quarantined" in f.message for f in report.findings)


def test_altered_last_record_is_not_passed_off_as_a_crash(tmp_path: Path) -> None:
    with AuditLog(small(tmp_path)) as log:
        feed(log, 4)
    path = list_log_files(tmp_path)[-1]
    lines = path.read_bytes().splitlines(keepends=True)
    assert b'"name":"web"' in lines[-1]
    lines[-1] = lines[-1].replace(b'"name":"web"', b'"name":"wob"')
    path.write_bytes(b"".join(lines))
    with AuditLog(small(tmp_path)) as log:
        feed(log, 1)
    report, _ = verify_directory(tmp_path)
    # The writer quarantined the damaged line, but it had been committed: a documented loss.
    assert report.ok
    lost, damaged = report.warnings
    assert "1 committed record(s)" in lost.message and "state file ahead" in lost.message
    assert "1 complete but damaged line(s)" in damaged.message


def test_silent_truncation_is_an_error_until_a_restart_documents_it(tmp_path: Path) -> None:
    with AuditLog(small(tmp_path)) as log:
        feed(log, 6)
    path = list_log_files(tmp_path)[-1]
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(b"".join(lines[:-3]))
    assert not verify_directory(tmp_path)[0].ok
    with AuditLog(small(tmp_path)) as log:
        feed(log, 1)
    rec = next(r for r in file_records(tmp_path) if r["kind"] == "log-recovered")
    assert rec["state"] == "ahead" and rec["lost_records"] == 3 and rec["state_seq"] == 6
    report, _ = verify_directory(tmp_path)
    assert report.ok
    (warn,) = report.warnings
    assert "3 committed record(s)" in warn.message and warn.seq == rec["seq"]


@pytest.mark.parametrize("damage", ["missing", "corrupt"])
def test_restart_without_a_usable_state_file_says_so(tmp_path: Path, damage: str) -> None:
    with AuditLog(small(tmp_path)) as log:
        feed(log, 2)
    state = tmp_path / STATE_NAME
    if damage == "missing":
        state.unlink()
    else:
        state.write_bytes(state.read_bytes().replace(b'"seq":2', b'"seq":9'))
    with AuditLog(small(tmp_path)) as log:
        feed(log, 1)
    rec = next(r for r in file_records(tmp_path) if r["kind"] == "log-recovered")
    assert rec["state"] == damage
    report, _ = verify_directory(tmp_path)
    assert report.ok and "cannot be ruled out" in report.warnings[0].message


def test_empty_newest_file_left_by_a_crash_is_removed(tmp_path: Path) -> None:
    with AuditLog(small(tmp_path, max_file_bytes=2048)) as log:
        feed(log, 6)
        seq = log.head[0]
    empty = tmp_path / f"audit-{seq + 1:012d}.jsonl"
    empty.write_bytes(b"")  # created at rotation, crashed before the first write
    with AuditLog(small(tmp_path, max_file_bytes=2048)) as log:
        feed(log, 1)
    rec = next(r for r in file_records(tmp_path) if r["kind"] == "log-recovered")
    assert rec["removed_files"] == [empty.name]
    assert verify_directory(tmp_path)[0].ok


def test_state_file_of_a_log_whose_files_are_gone(tmp_path: Path) -> None:
    with AuditLog(small(tmp_path)) as log:
        feed(log, 2)
        old = log.log_id
    for p in list_log_files(tmp_path):
        p.unlink()
    with AuditLog(small(tmp_path)) as log:
        assert log.log_id != old
    start = file_records(tmp_path)[0]
    assert start["kind"] == "log-start" and start["previous_log"] == old
    assert start["previous_seq"] == 2
    report, _ = verify_directory(tmp_path)
    assert report.ok and old in report.warnings[0].message


def test_denials_are_mirrored_one_line_each(tmp_path: Path) -> None:
    mirror = ListMirror()
    with AuditLog(small(tmp_path), mirror=mirror) as log:
        recs = feed(log, 6)
    denials = [r for r in recs if r.denied]
    assert len(mirror.lines) == len(denials) == 2
    assert mirror.lines[0].startswith("shyped: denied { evtchn } for scontext=web tcontext=db")
    assert mirror.lines[0].endswith(f"seq={denials[0].seq}")


def test_tail_and_follow_across_rotation(tmp_path: Path) -> None:
    with AuditLog(small(tmp_path, max_file_bytes=2048)) as log:
        recs = feed(log, 10)
        head = log.head[0]
        assert len(list_log_files(tmp_path)) > 1
        last = tail_records(tmp_path, 3)
        assert [r.seq for r in last] == [head - 2, head - 1, head]
        denied = tail_records(tmp_path, 2, denied_only=True)
        assert [r.seq for r in denied] == [r.seq for r in recs if r.denied][-2:]
        assert all(r.denied for r in denied)
        follower = Follower(tmp_path)
        assert follower.poll() == []
        files_before = len(list_log_files(tmp_path))
        new = feed(log, 20, flush_every=4)
        assert len(list_log_files(tmp_path)) > files_before  # rotated while following
        seen = [r.seq for r in follower.poll()]
        # Everything after what was there, in order; the log's own rotate records included.
        assert seen == list(range(head + 1, log.head[0] + 1))
        assert {r.seq for r in new} <= set(seen)
        follower.close()


def test_follower_waits_for_the_end_of_a_line(tmp_path: Path) -> None:
    with AuditLog(small(tmp_path)) as log:
        feed(log, 1)
    follower = Follower(tmp_path)
    path = list_log_files(tmp_path)[-1]
    with AuditLog(small(tmp_path)) as log:
        rec = log.record_event("reconcile", domains=3)
        log.flush()
    data = path.read_bytes()
    path.write_bytes(data[: -len(rec.line)] + rec.line[:10])
    assert follower.poll() == []
    path.write_bytes(data)
    assert [r.seq for r in follower.poll()] == [rec.seq]
    follower.close()


def test_metrics(tmp_path: Path) -> None:
    registry = CollectorRegistry()
    with AuditLog(small(tmp_path)) as log:
        registry.register(AuditCollector(log))
        feed(log, 4)
        text = generate_latest(registry).decode()
    assert "shyped_audit_healthy 1.0" in text and "shyped_audit_unavailable 0.0" in text
    assert "shyped_audit_records_total 5.0" in text  # log-start + 4


def test_log_kinds_cannot_be_forged_through_the_api(tmp_path: Path) -> None:
    with AuditLog(small(tmp_path)) as log, pytest.raises(ValueError, match="audit log itself"):
        log.record_event("log-recovered", torn_bytes=0)


def test_state_file_content(tmp_path: Path) -> None:
    with AuditLog(small(tmp_path)) as log:
        log.record_decision(DENY, subject=__import__("shyped.core.audit").core.audit.Party("w", 1))
        log.flush()
        head = log.head
    raw = (tmp_path / STATE_NAME).read_bytes()
    assert len(raw) == 512
    doc = json.loads(raw)
    assert (doc["seq"], doc["hash"], doc["file"]) == (*head, "audit-000000000000.jsonl")
    os.truncate(tmp_path / STATE_NAME, 100)  # torn state write: detected, not trusted
    assert read_state(tmp_path / STATE_NAME) == (None, "corrupt")


def test_cutting_a_committed_record_in_half_is_not_a_crash_tail(tmp_path: Path) -> None:
    with AuditLog(small(tmp_path)) as log:
        recs = feed(log, 4)
    path = list_log_files(tmp_path)[-1]
    data = path.read_bytes()
    cut = len(recs[-1].line) // 3
    path.write_bytes(data[:-cut])  # the state file says this record was written
    report, _ = verify_directory(tmp_path)
    err = report.first_error
    assert err is not None and "truncated" in err.message and err.seq == recs[-1].seq
    assert any("incomplete last line" in w.message for w in report.warnings)
    with AuditLog(small(tmp_path)) as log:  # a restart documents the loss
        feed(log, 1)
    rec = next(r for r in file_records(tmp_path) if r["kind"] == "log-recovered")
    assert rec["lost_records"] == 1 and rec["torn_bytes"] == len(recs[-1].line) - cut
    report, _ = verify_directory(tmp_path)
    assert report.ok and "1 committed record(s)" in report.warnings[0].message
