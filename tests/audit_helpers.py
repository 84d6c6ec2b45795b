"""Helpers for the audit tests: feeding records, a mirror that keeps lines, a tiny tmpfs."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import attrs
import pytest

from shyped.core.audit import Party, Record
from shyped.policy.decisions import Decision, Hook, Rule
from shyped.service.auditlog import AuditLog, AuditSettings, list_log_files

DENY = Decision(False, Hook.EVTCHN, Rule.STE, "'web' and 'db' share no STE type", "web", "db")
PERMIT = Decision(True, Hook.DEVICE_CHANNEL, Rule.STE, "'web' and 'net' share 'http'", "web")
POLICY_SHA = "ab" * 32


@attrs.define
class ListMirror:
    """A denial mirror that keeps its lines."""

    lines: list[str] = attrs.field(factory=list)

    def denial(self, line: str, record: Record) -> None:
        self.lines.append(line)


def feed(log: AuditLog, n: int, *, flush_every: int = 1) -> list[Record]:
    """`n` records (denials, permits and policy loads in turn), flushed every `flush_every`."""
    out: list[Record] = []
    for i in range(n):
        if i % 3 == 0:
            rec = log.record_decision(
                DENY,
                subject=Party("web", 3, "11111111-2222-3333-4444-555555555555"),
                obj=Party("db", 5, "66666666-7777-8888-9999-000000000000"),
                policy_sha256=POLICY_SHA,
                mode="enforcing",
            )
        elif i % 3 == 1:
            rec = log.record_decision(
                PERMIT, subject=Party("web", 3), obj=Party("net", 0), policy_sha256=POLICY_SHA
            )
        else:
            rec = log.record_event("policy-load", name="hosting", version=f"1.{i}")
        out.append(rec)
        if (i + 1) % flush_every == 0:
            log.flush()
    log.flush()
    return out


def file_records(directory: Path) -> list[dict[str, object]]:
    """Every line of every log file of `directory`, parsed as JSON (must all be complete)."""
    out = []
    for path in list_log_files(directory):
        for line in path.read_bytes().splitlines():
            out.append(json.loads(line))
    return out


def small(directory: Path, **kw: object) -> AuditSettings:
    return AuditSettings(directory=directory, **kw)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------ tmpfs


def mount_tmpfs(path: Path, size: str) -> None:
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)],
        check=True,
        capture_output=True,
    )


def resize_tmpfs(path: Path, size: str) -> None:
    subprocess.run(
        ["mount", "-o", f"remount,size={size}", str(path)], check=True, capture_output=True
    )


@contextmanager
def tiny_tmpfs(base: Path, size: str = "16k") -> Iterator[Path]:
    """A tmpfs of `size` mounted at a fresh directory under `base` (skips if mount fails)."""
    mnt = base / "tinyfs"
    mnt.mkdir()
    try:
        mount_tmpfs(mnt, size)
    except (OSError, subprocess.CalledProcessError) as e:
        detail = getattr(e, "stderr", b"") or b""
        pytest.skip(f"cannot mount a tmpfs here (needs root/CAP_SYS_ADMIN): {e} {detail!r}")
    try:
        yield mnt
    finally:
        # A failed test may still hold files open there: then detach it lazily.
        done = subprocess.run(["umount", str(mnt)], check=False, capture_output=True)
        if done.returncode != 0:
            subprocess.run(["umount", "-l", str(mnt)], check=False, capture_output=True)
