"""`AsyncAuditLog`: the daemon's API — Deferreds that fire after the covering fsync."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import pytest_twisted
from audit_helpers import DENY, file_records, resize_tmpfs, small, tiny_tmpfs
from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredList

from shyped.core.audit import Party, Record
from shyped.service.auditlog import (
    STATE_NAME,
    AsyncAuditLog,
    AuditLog,
    AuditState,
    AuditUnavailable,
    list_log_files,
    read_state,
    verify_directory,
)


def make(directory: Path, **kw: object) -> AsyncAuditLog:
    alog = AsyncAuditLog(AuditLog(small(directory, **kw)), reactor)
    alog.start()
    return alog


@pytest_twisted.ensureDeferred
async def test_deferred_fires_only_once_the_record_is_on_disk(tmp_path: Path) -> None:
    alog = make(tmp_path)
    try:
        d = alog.record_decision(DENY, subject=Party("web", 3), obj=Party("db", 5))
        rec = await d
        # When the daemon hears "done", the line is in the file and the state file names it.
        assert rec.line in list_log_files(tmp_path)[-1].read_bytes()
        anchor, _ = read_state(tmp_path / STATE_NAME)
        assert anchor is not None and anchor.seq >= rec.seq
        ev = await alog.record_event("mode-change", mode="permissive")
        assert ev.seq == rec.seq + 1
    finally:
        await alog.stop()
    assert verify_directory(tmp_path)[0].ok


@pytest_twisted.ensureDeferred
async def test_records_of_one_tick_share_one_write_and_fsync(tmp_path: Path) -> None:
    alog = make(tmp_path)
    try:
        await alog.record_event("daemon-start", version="t")
        before = alog.log.stats.batches
        ds = [
            alog.record_decision(DENY, subject=Party(f"vm{i}", i), obj=Party("db", 5))
            for i in range(200)
        ]
        results = await DeferredList(ds, fireOnOneErrback=True, consumeErrors=True)
        recs: list[Record] = [r for _, r in results]
        assert [r.seq for r in recs] == list(range(recs[0].seq, recs[0].seq + 200))
        assert alog.log.stats.batches == before + 1  # group commit: one batch for the tick
    finally:
        await alog.stop()


@pytest_twisted.ensureDeferred
async def test_stop_writes_what_is_queued_and_releases_the_directory(tmp_path: Path) -> None:
    alog = make(tmp_path)
    ds = [alog.record_event("reconcile", domains=i) for i in range(5)]
    await alog.stop()
    assert all(d.called for d in ds)
    with pytest.raises(RuntimeError, match="stopping"):
        alog.record_event("reconcile", domains=9)
    assert [r["kind"] for r in file_records(tmp_path)][-5:] == ["reconcile"] * 5
    with AuditLog(small(tmp_path)) as again:  # the lock is free again
        assert again.head[0] == 5


@pytest.fixture
def tiny(tmp_path: Path) -> Iterator[Path]:
    with tiny_tmpfs(tmp_path, "16k") as mnt:
        yield mnt


@pytest_twisted.ensureDeferred
async def test_fail_closed_errbacks_and_recovers_without_new_traffic(tiny: Path) -> None:
    alog = make(tiny / "audit", retry_interval=0.05)
    states: list[tuple[AuditState, bool]] = []
    back: Deferred[None] = Deferred()

    def listener(state: AuditState, why: str) -> None:
        states.append((state, threading.current_thread() is threading.main_thread()))
        if state is AuditState.OK and not back.called:
            back.callback(None)

    alog.add_listener(listener)
    try:
        durable = refused = 0
        for _ in range(200):
            try:
                await alog.record_decision(DENY, subject=Party("web", 3), obj=Party("db", 5))
                durable += 1
            except AuditUnavailable:
                refused += 1
                break
        assert refused == 1 and durable > 0
        assert not alog.healthy and not alog.available
        assert states == [(AuditState.UNAVAILABLE, True)]  # told on the reactor thread
        resize_tmpfs(tiny, "1m")
        await back  # the periodic retry found space: no new record needed
        assert alog.healthy and states[-1] == (AuditState.OK, True)
        rec = await alog.record_event("daemon-stop")
        assert rec.seq == durable + 2  # log-start, records, audit-resumed, this
    finally:
        await alog.stop()
    recs = file_records(tiny / "audit")
    assert recs[-2]["kind"] == "audit-resumed" and recs[-2]["refused"] == 1
    assert verify_directory(tiny / "audit")[0].ok
