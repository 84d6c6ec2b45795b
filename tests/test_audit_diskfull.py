"""Disk full on a real, tiny tmpfs: fail-closed refuses and recovers, ignore keeps going.

Each test mounts its own tmpfs of a few KiB (root needed; skipped with the reason otherwise)
and grows it with ``mount -o remount,size=…`` to give the space back.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from audit_helpers import DENY, ListMirror, feed, file_records, resize_tmpfs, small, tiny_tmpfs
from twisted.logger import globalLogPublisher

from shyped.core.audit import Kind, Party, Record, parse_record
from shyped.service.auditlog import (
    AuditLog,
    AuditState,
    AuditUnavailable,
    DiskFullAction,
    list_log_files,
    verify_directory,
)


@pytest.fixture
def tiny(tmp_path: Path) -> Iterator[Path]:
    with tiny_tmpfs(tmp_path, "16k") as mnt:
        yield mnt


@pytest.fixture
def log_events() -> Iterator[list[dict[str, Any]]]:
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    yield events
    globalLogPublisher.removeObserver(events.append)


def deny(log: AuditLog) -> Record:
    return log.record_decision(DENY, subject=Party("web", 3), obj=Party("db", 5), mode="enforcing")


def fill_until_refused(log: AuditLog, limit: int = 500) -> list[Record]:
    """Durable records written before the first refusal (which must come before `limit`)."""
    durable: list[Record] = []
    for _ in range(limit):
        rec = deny(log)
        try:
            log.flush()
        except AuditUnavailable:
            return durable
        durable.append(rec)
    raise AssertionError("the tiny file system never filled up")


def test_fail_closed_refuses_reports_and_recovers(
    tiny: Path, log_events: list[dict[str, Any]]
) -> None:
    changes: list[tuple[AuditState, str]] = []
    mirror = ListMirror()
    log = AuditLog(small(tiny / "audit", retry_interval=0), mirror=mirror)
    log.add_listener(lambda s, why: changes.append((s, why)))
    log.open()
    durable = fill_until_refused(log)
    assert durable, "nothing fitted at all"
    # Unavailable: the state the daemon turns into denials.
    assert log.state is AuditState.UNAVAILABLE and not log.healthy and not log.available
    assert changes == [(AuditState.UNAVAILABLE, "No space left on device")]
    assert any(
        e.get("log_level").name == "critical" and "AUDIT UNAVAILABLE" in e["log_format"]
        for e in log_events
    )
    # Further records are refused (each retry fails while the disk is full) and counted.
    for _ in range(3):
        with pytest.raises(AuditUnavailable, match="No space left on device"):
            deny(log)
    assert log.stats.refused == 4 and log.stats.write_errors >= 2
    assert mirror.lines[-1].endswith("audit=refused")  # denials still reach journald
    # No byte of a refused batch stayed behind: what is there verifies, up to the last
    # durable record.
    report, _ = verify_directory(tiny / "audit")
    assert report.ok and not report.warnings and report.last_seq == durable[-1].seq
    # Space comes back: the next record goes through, after a record counting the refusals.
    resize_tmpfs(tiny, "1m")
    rec = deny(log)
    log.flush()
    assert log.healthy and changes[-1] == (AuditState.OK, "writing again")
    on_disk = file_records(tiny / "audit")
    resumed = on_disk[-2]
    assert resumed["kind"] == "audit-resumed" and resumed["refused"] == 4
    assert resumed["lost"] == 0 and resumed["kinds"] == {"decision": 4}
    assert resumed["error"] == "No space left on device" and resumed["action"] == "fail-closed"
    assert on_disk[-1]["seq"] == rec.seq == durable[-1].seq + 2
    log.close()
    report, _ = verify_directory(tiny / "audit")
    assert report.ok
    (warn,) = report.warnings
    assert "4 record(s) refused" in warn.message and warn.seq == resumed["seq"]


def test_fail_closed_retries_at_most_once_per_interval(tiny: Path) -> None:
    now = [0.0]
    log = AuditLog(small(tiny / "audit", retry_interval=10), monotonic=lambda: now[0])
    log.open()
    fill_until_refused(log)
    resize_tmpfs(tiny, "1m")
    with pytest.raises(AuditUnavailable):  # space is back, but the retry is not due yet
        deny(log)
    now[0] += 10
    deny(log)
    log.flush()
    assert log.healthy
    log.close()
    assert verify_directory(tiny / "audit")[0].ok


def test_try_resume_recovers_without_new_records(tiny: Path) -> None:
    log = AuditLog(small(tiny / "audit", retry_interval=3600))
    log.open()
    fill_until_refused(log)
    assert not log.try_resume()
    resize_tmpfs(tiny, "1m")
    assert log.try_resume() and log.healthy
    log.close()
    assert file_records(tiny / "audit")[-1]["kind"] == "audit-resumed"
    assert verify_directory(tiny / "audit")[0].ok


def test_ignore_keeps_going_and_counts_what_it_lost(
    tiny: Path, log_events: list[dict[str, Any]]
) -> None:
    changes: list[AuditState] = []
    log = AuditLog(small(tiny / "audit", disk_full_action=DiskFullAction.IGNORE))
    log.add_listener(lambda s, _: changes.append(s))
    log.open()
    written = lost = 0
    for _ in range(300):
        deny(log)
        if log.flush():
            written += 1
        else:
            lost += 1
    assert lost > 0 and written > 0
    assert log.state is AuditState.DEGRADED and not log.healthy and log.available
    assert changes == [AuditState.DEGRADED]
    assert any("AUDIT RECORDS LOST" in e.get("log_format", "") for e in log_events)
    resize_tmpfs(tiny, "1m")
    deny(log)
    assert log.flush() and log.healthy and changes[-1] is AuditState.OK
    log.close()
    resumed = [r for r in file_records(tiny / "audit") if r["kind"] == "audit-resumed"]
    assert [r["lost"] for r in resumed] == [lost] and resumed[0]["refused"] == 0
    report, _ = verify_directory(tiny / "audit")
    assert report.ok and f"{lost} lost" in report.warnings[0].message


def test_disk_full_at_start_then_space_returns(tmp_path: Path) -> None:
    with tiny_tmpfs(tmp_path, "4k") as mnt:
        (mnt / "audit").mkdir()
        (mnt / "filler").write_bytes(b"x" * 4096)
        with pytest.raises(OSError) as exc:
            (mnt / "more").write_bytes(b"x" * 4096)
        assert exc.value.errno == errno.ENOSPC
        log = AuditLog(small(mnt / "audit", retry_interval=0))
        log.open()  # starts, but cannot write its first record: unavailable, not dead
        assert log.state is AuditState.UNAVAILABLE
        with pytest.raises(AuditUnavailable):
            deny(log)
        (mnt / "filler").unlink()
        (mnt / "more").unlink(missing_ok=True)
        rec = deny(log)
        log.flush()
        log.close()
        kinds = [r["kind"] for r in file_records(mnt / "audit")]
        assert kinds == ["log-start", "audit-resumed", "decision"] and rec.seq == 2
        report, _ = verify_directory(mnt / "audit")
        assert report.ok and report.first_seq == 0


def fill_fs(path: Path) -> None:
    """Take every free byte of the file system holding `path` (a filler file)."""
    fd = os.open(path / "filler", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        for _ in range(10000):
            try:
                os.write(fd, b"x" * 512)
            except OSError as e:
                assert e.errno == errno.ENOSPC
                return
    finally:
        os.close(fd)
    raise AssertionError("the tiny file system never filled up")


def test_disk_full_during_rotation_leaves_no_half_file(tiny: Path) -> None:
    d = tiny / "audit"
    log = AuditLog(small(d, max_file_bytes=1024, keep_files=0, retry_interval=0))
    log.open()
    while (log.current_file or d).stat().st_size < 1024:  # the next record rotates
        deny(log)
        log.flush()
    files = list_log_files(d)
    fill_fs(tiny)
    with pytest.raises(AuditUnavailable):
        deny(log)
        log.flush()
    assert log.stats.rotations == len(files) - 1  # the failed rotation did not count
    assert list_log_files(d) == files  # the new file was removed again
    assert verify_directory(d)[0].ok
    (tiny / "filler").unlink()
    resize_tmpfs(tiny, "1m")  # tmpfs charges a page per file: make room for more files
    feed(log, 30, flush_every=5)
    log.close()
    report, _ = verify_directory(d)
    assert report.ok and report.files > len(files)
    kinds = [r["kind"] for r in file_records(d)]
    assert kinds.count(Kind.AUDIT_RESUMED) == 1
    first_new = list_log_files(d)[len(files)]
    assert file_records(d)[0]["kind"] == "log-start"
    rotate = parse_record(first_new.read_bytes().splitlines(keepends=True)[0])
    assert rotate.kind == Kind.ROTATE and rotate.body["file"] == first_new.name
