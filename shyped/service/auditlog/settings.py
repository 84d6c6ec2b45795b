"""The audit log's settings, states, errors and counters."""

from __future__ import annotations

import enum
import re
from pathlib import Path
from typing import Final

import attrs
from twisted.logger import Logger

_log = Logger(namespace="shyped.audit")


DEFAULT_DIRECTORY: Final = Path("/var/log/shyped/audit")
STATE_NAME: Final = "audit.state"
STATE_SIZE: Final = 512
FILE_RE: Final = re.compile(r"audit-(\d{12})\.jsonl")
DIR_MODE: Final = 0o750


def log_file_name(first_seq: int) -> str:
    """The name of the log file whose first record has `first_seq`."""
    return f"audit-{first_seq:012d}.jsonl"


class DiskFullAction(enum.StrEnum):
    """What a write error does (auditd's ``disk_full_action``)."""

    FAIL_CLOSED = "fail-closed"
    IGNORE = "ignore"


class AuditState(enum.StrEnum):
    """Whether records reach stable storage."""

    OK = "ok"
    UNAVAILABLE = "unavailable"  # fail-closed after a write error: records are refused
    DEGRADED = "degraded"  # ignore after a write error: records are dropped


class AuditUnavailable(Exception):
    """The audit log cannot write (fail-closed): the action must not be reported done."""


class AuditLogBusy(Exception):
    """Another process holds the audit directory."""


@attrs.frozen
class AuditSettings:
    """The ``[audit]`` settings: where, how big, how many, what a write error does."""

    directory: Path = DEFAULT_DIRECTORY
    max_file_bytes: int = attrs.field(default=8 << 20)
    keep_files: int = attrs.field(default=16)  # files kept, the current one included; 0: all
    disk_full_action: DiskFullAction = DiskFullAction.FAIL_CLOSED
    retry_interval: float = 5.0  # seconds between write attempts while fail-closed
    mirror_denials: bool = False  # one journald/syslog line per denial
    group: str | None = None  # files 0640 owned by this group (readers); else 0600

    @max_file_bytes.validator
    def _check_size(self, _a: object, v: int) -> None:
        if v < 1024:
            raise ValueError(f"audit max_file_bytes must be at least 1024, not {v}")

    @keep_files.validator
    def _check_keep(self, _a: object, v: int) -> None:
        if v < 0:
            raise ValueError(f"audit keep_files must be 0 (keep all) or more, not {v}")


@attrs.define
class AuditStats:
    """Counters for metrics and tests."""

    records_written: int = 0
    batches: int = 0
    bytes_written: int = 0
    write_errors: int = 0
    refused: int = 0
    lost: int = 0
    rotations: int = 0
    files_removed: int = 0
    state_errors: int = 0
    recoveries: int = 0
    last_error: str | None = None
