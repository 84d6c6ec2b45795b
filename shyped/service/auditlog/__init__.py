"""The audit log on disk: append-only writer, rotation, retention, crash recovery, disk full.

Layout of the audit directory (created 0750; files 0600, or 0640 and group-owned when a read
group is configured)::

    audit-000000000000.jsonl   records seq 0 … (the name is the seq of the file's first record)
    audit-000000004711.jsonl   the newest file: begins with a ``rotate`` record
    audit.state                the chain head after the last fsync (seq, hash, log id, file)
    audit-….jsonl.torn[.N]     bytes quarantined by a crash recovery, if any

Writing is group commit: `AuditLog.append` seals a record into the chain in memory and
`AuditLog.flush` writes every pending record with one ``write`` and one ``fdatasync``, then
updates the state file. Nothing is durable, and no enforcing action may be reported done,
before the `flush` covering its record returned. The daemon uses `AsyncAuditLog`, which does
exactly that on a writer thread: `append` returns a Deferred that fires once the record is on
stable storage, and records arriving while an fsync runs are committed together by the next.

Write errors (disk full, EIO) are handled per ``disk_full_action`` as auditd does:
``fail-closed`` (default) undoes the partial write, refuses the batch (`AuditUnavailable`) and
every record after it until a write succeeds again, with `AuditLog.healthy` false and the
listeners told, so the daemon denies new admissions and devices; ``ignore`` drops the records
and carries on. Either way the first record written afterwards is ``audit-resumed`` saying how
many records were refused or lost, and the chain continues unbroken.

At `AuditLog.open` the writer locks the state file (one writer per directory), takes the last
well-formed record of the newest file as the head, moves anything after it (an interrupted
write) to a quarantine file, compares the head with the state file, and writes a
``log-recovered`` record documenting whatever it found. What `verify` can detect with and
without the state file is described in docs/audit.md.
"""

from __future__ import annotations

from shyped.service.auditlog.asynclog import (
    AsyncAuditLog,
)
from shyped.service.auditlog.collector import (
    AuditCollector,
)
from shyped.service.auditlog.files import (
    decode_state,
    encode_state,
    list_log_files,
    read_lines,
    read_state,
    split_lines,
)
from shyped.service.auditlog.mirror import (
    JournalMirror,
    Mirror,
    SyslogMirror,
    system_mirror,
)
from shyped.service.auditlog.reader import (
    Follower,
    tail_records,
    verify_directory,
    verify_files,
)
from shyped.service.auditlog.settings import (
    DEFAULT_DIRECTORY,
    STATE_NAME,
    AuditLogBusy,
    AuditSettings,
    AuditState,
    AuditStats,
    AuditUnavailable,
    DiskFullAction,
    log_file_name,
)
from shyped.service.auditlog.writer import (
    AuditLog,
)

__all__ = [
    "DEFAULT_DIRECTORY",
    "STATE_NAME",
    "AsyncAuditLog",
    "AuditCollector",
    "AuditLog",
    "AuditLogBusy",
    "AuditSettings",
    "AuditState",
    "AuditStats",
    "AuditUnavailable",
    "DiskFullAction",
    "Follower",
    "JournalMirror",
    "Mirror",
    "SyslogMirror",
    "decode_state",
    "encode_state",
    "list_log_files",
    "log_file_name",
    "read_lines",
    "read_state",
    "split_lines",
    "system_mirror",
    "tail_records",
    "verify_directory",
    "verify_files",
]
