"""A writer process SIGKILLed in the middle of writing: the log verifies up to the last
complete record, every acknowledged record is there, and a restarted writer continues the
chain (quarantining an interrupted write and saying so in a ``log-recovered`` record)."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from audit_helpers import feed, file_records, small

from shyped.core.audit import parse_record
from shyped.core.auditverify import Level
from shyped.service.auditlog import AuditLog, list_log_files, verify_directory

# The writer: batches of 1-5 records, flushed, acknowledged on stdout ("acked <seq>") only
# after flush returned. In "tear" mode its os.write writes 20 bytes of the first batch that
# matches TEAR and then the process SIGKILLs itself: a real process dying mid-write.
# "rotate-empty": it dies before writing a byte of a rotated file it just created.
WRITER = r"""
import os, random, signal, sys
from pathlib import Path
from shyped.core.audit import Party
from shyped.service.auditlog import AuditLog, AuditSettings
from shyped.policy.decisions import Decision, Hook, Rule

directory, max_bytes, tear, seed = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
rng = random.Random(seed)
log = AuditLog(AuditSettings(directory=Path(directory), max_file_bytes=max_bytes, keep_files=0))
log.open()
if tear != "none":
    real_write, writes = os.write, [0]
    def torn_write(fd, data):
        data = bytes(data)
        first = data.split(b"\n", 1)[0]
        rotate = tear.startswith("rotate") and b'"kind":"rotate"' in first
        if data.startswith(b'{"hash":') and (tear == "any" and writes[0] >= 8 or rotate):
            real_write(fd, data[:0 if tear == "rotate-empty" else 20])  # in the first record
            os.kill(os.getpid(), signal.SIGKILL)
        writes[0] += 1
        return real_write(fd, data)
    os.write = torn_write
deny = Decision(False, Hook.VCHAN, Rule.STE, "no common type", "a", "b")
for _ in range(100000):  # bounded: a writer that never tears must not run forever
    for _ in range(rng.randint(1, 5)):
        log.record_decision(deny, subject=Party("a", 1), obj=Party("b", 2), mode="enforcing")
    log.flush()
    print("acked", log.head[0], flush=True)
sys.exit(3)
"""


def run_writer(directory: Path, *, max_bytes: int, tear: str, seed: int, kill_after: int) -> int:
    """Run the writer until it acknowledged `kill_after` batches (then SIGKILL it) or killed
    itself; the last acknowledged seq."""
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(directory), str(max_bytes), tear, str(seed)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    acked = -1
    try:
        for n, line in enumerate(proc.stdout):
            acked = int(line.split()[1])
            if n + 1 >= kill_after:
                os.kill(proc.pid, signal.SIGKILL)  # anywhere in its loop: maybe mid-write
                break
        rest = proc.stdout.read()  # acknowledged before the kill landed
        for line in rest.splitlines():
            acked = int(line.split()[1])
    finally:
        proc.kill()
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    return acked


def restart_and_continue(directory: Path, last_seq: int) -> int:
    """A restarted writer continues the chain after `last_seq` (the last complete record): at
    once, or after its own recovery records where the kill left something to clean up (a
    rotated file created but not written yet: removed, which a ``log-recovered`` record says,
    after a ``rotate`` when the head's file is full). Three records more; the new head."""
    with AuditLog(small(directory, max_file_bytes=4096, keep_files=0)) as log:
        own = [r for r in file_records(directory) if int(str(r["seq"])) > last_seq]
        assert log.head[0] == last_seq + len(own)
        if own:
            assert [r["kind"] for r in own] in (["log-recovered"], ["rotate", "log-recovered"])
            assert own[-1]["after_seq"] == last_seq
        feed(log, 3)
        return log.head[0]


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_sigkill_anywhere_then_restart(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    last_seq = -1
    for _round in range(3):
        acked = run_writer(
            tmp_path, max_bytes=4096, tear="none", seed=rng.randrange(1000),
            kill_after=rng.randint(5, 60),
        )  # fmt: skip
        assert acked > last_seq
        report, _ = verify_directory(tmp_path)
        # It verifies up to the last complete record, and nothing acknowledged is missing.
        assert report.ok, [str(f) for f in report.errors]
        assert report.last_seq is not None and report.last_seq >= acked
        # A restarted writer continues the same chain.
        last_seq = restart_and_continue(tmp_path, report.last_seq)
        report, _ = verify_directory(tmp_path)
        assert report.ok and report.last_seq == last_seq and report.first_seq == 0
    assert len({r["log"] for r in file_records(tmp_path)}) == 1
    assert len(list_log_files(tmp_path)) > 1  # it rotated on the way


def test_a_kill_between_creating_a_rotated_file_and_writing_it(tmp_path: Path) -> None:
    """The window a SIGKILL "anywhere" sometimes hits (more often on a loaded host): the
    rotated file exists and is empty. The restart removes it and says so before going on."""
    acked = run_writer(tmp_path, max_bytes=4096, tear="rotate-empty", seed=7, kill_after=10**9)
    newest = list_log_files(tmp_path)[-1]
    assert newest.stat().st_size == 0  # created, not written
    report, _ = verify_directory(tmp_path)
    assert report.ok and report.last_seq is not None and report.last_seq >= acked
    head = restart_and_continue(tmp_path, report.last_seq)
    (recovered,) = [r for r in file_records(tmp_path) if r["kind"] == "log-recovered"]
    assert recovered["removed_files"] == [newest.name]
    report, _ = verify_directory(tmp_path)
    assert report.ok and report.last_seq == head and report.first_seq == 0


@pytest.mark.parametrize("tear", ["any", "rotate"])
def test_torn_write_of_a_killed_process_is_recovered(tmp_path: Path, tear: str) -> None:
    acked = run_writer(tmp_path, max_bytes=2048, tear=tear, seed=7, kill_after=10**9)
    assert acked >= 0
    report, _ = verify_directory(tmp_path)
    # Up to the last complete record: every acknowledged one, maybe a few more (a rotating
    # batch writes the old file's part completely before the new file's).
    assert report.ok and report.last_seq is not None and report.last_seq >= acked
    last = report.last_seq
    (torn,) = [f for f in report.findings if "incomplete last line" in f.message]
    assert torn.level is Level.WARNING and torn.seq == last + 1
    newest = list_log_files(tmp_path)[-1]
    with AuditLog(small(tmp_path, max_file_bytes=2048, keep_files=0)) as log:
        assert log.stats.recoveries == 1
        feed(log, 2)
    recs = file_records(tmp_path)
    (recovered,) = [r for r in recs if r["kind"] == "log-recovered"]
    # Right after the head (or after a rotate record, if the head's file was already full).
    assert recovered["after_seq"] == last and recovered["seq"] in (last + 1, last + 2)
    assert [r["seq"] for r in recs] == list(range(len(recs)))
    assert recovered["torn_bytes"] > 0 and recovered["damaged_lines"] == 0
    if tear == "rotate":  # the interrupted write was a new file's first: the file is gone
        assert recovered["removed_files"] == [newest.name]
    quarantined = tmp_path / str(recovered["quarantine"])
    assert len(quarantined.read_bytes()) == recovered["torn_bytes"]
    report, _ = verify_directory(tmp_path)
    assert report.ok and not report.warnings
    assert any("interrupted write" in f.message for f in report.findings)
    assert parse_record(list_log_files(tmp_path)[-1].read_bytes().splitlines(True)[-1])
