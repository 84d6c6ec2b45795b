"""What the writer keeps: its state, the records pending, the outage, and its listeners.

The writer (`shyped.service.auditlog.writer.AuditLog`) builds on `_WriterState` through
the rotation (`shyped.service.auditlog.rotation`)."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Final, Generic, TypeVar

import attrs
from twisted.logger import Logger

from shyped.core.audit import (
    GENESIS,
    Draft,
    Kind,
    Party,
    Record,
    decision_draft,
    event_draft,
    format_time,
)
from shyped.policy.decisions import Decision
from shyped.service.auditlog.files import (
    _LogFile,
)
from shyped.service.auditlog.mirror import (
    Mirror,
    system_mirror,
)
from shyped.service.auditlog.settings import (
    AuditSettings,
    AuditState,
    AuditStats,
)

_log = Logger(namespace="shyped.audit")


T = TypeVar("T")
Listener = Callable[[AuditState, str], None]


@attrs.frozen
class HeadDraft:
    """A draft that names the chain head it follows: ``head_seq`` and ``head_hash`` (seq and
    hash of the record sealed just before it) are added to its body when it is sealed, i.e.
    after every record appended before it, rotation and resume records included. A head read
    before appending would miss the records still on their way to the writer."""

    draft: Draft

    def at(self, seq: int, head: str) -> Draft:
        body = {**self.draft.body, "head_seq": seq, "head_hash": head}
        return attrs.evolve(self.draft, body=body)


class _Recorder(Generic[T]):
    """`record_decision` / `record_event`, the calls the daemon makes, over some `append`."""

    def append(self, draft: Draft | HeadDraft) -> T:
        raise NotImplementedError

    def now(self) -> str:
        raise NotImplementedError

    def record_decision(
        self,
        decision: Decision,
        *,
        subject: Party,
        obj: Party | None = None,
        policy_sha256: str | None = None,
        mode: str | None = None,
        **details: object,
    ) -> T:
        """Audit one access decision (see `shyped.core.audit.decision_draft`)."""
        return self.append(
            decision_draft(
                decision,
                self.now(),
                subject=subject,
                obj=obj,
                policy_sha256=policy_sha256,
                mode=mode,
                **details,
            )
        )

    def record_event(self, kind: str | Kind, **details: object) -> T:
        """Audit a daemon event: policy load/reject, mode change, relabel, start/stop …"""
        return self.append(event_draft(kind, self.now(), **details))

    def record_event_at_head(self, kind: str | Kind, **details: object) -> T:
        """`record_event` naming the chain head it follows (`HeadDraft`), e.g. ``daemon-stop``."""
        return self.append(HeadDraft(event_draft(kind, self.now(), **details)))


@attrs.define
class _Pending:
    record: Record
    new_file: bool  # this record begins a new file
    counted: bool  # a caller's record (not the log's own bookkeeping)
    removes: tuple[_LogFile, ...] = ()  # files retention removes once this record is durable


@attrs.define
class _Outage:
    since: str
    error: str
    refused: int = 0
    lost: int = 0
    failed_writes: int = 0
    kinds: Counter[str] = attrs.field(factory=Counter)


class _StateView:
    """The audit state and its listeners: the same view on the writer and on its adaptor."""

    _state: AuditState
    _listeners: list[Listener]

    @property
    def state(self) -> AuditState:
        return self._state

    @property
    def healthy(self) -> bool:
        """Records reach stable storage."""
        return self._state is AuditState.OK

    @property
    def available(self) -> bool:
        """False while fail-closed after a write error: the daemon must deny new admissions."""
        return self._state is not AuditState.UNAVAILABLE

    def _tell_listeners(self, state: AuditState, reason: str) -> None:
        for listener in list(self._listeners):
            try:
                listener(state, reason)
            except Exception as e:
                _log.failure("audit: state listener failed: {e}", e=str(e))


class _WriterState(_StateView, _Recorder[Record]):
    """The writer's state and its read-only view; `AuditLog` is the writer."""

    def __init__(
        self,
        settings: AuditSettings,
        *,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        mirror: Mirror | None = None,
        durable: bool = True,
    ) -> None:
        self.settings: Final = settings
        self.stats = AuditStats()
        self._clock = clock
        self._monotonic = monotonic
        if mirror is None and settings.mirror_denials:
            mirror = system_mirror()
        self._mirror = mirror
        self._durable = durable
        self._dir = settings.directory
        self._mode = 0o640 if settings.group else 0o600
        self._gid = -1
        self._listeners: list[Listener] = []
        self._state = AuditState.OK
        self._outage: _Outage | None = None
        self._last_attempt = float("-inf")
        self._open = False
        self._state_fd = -1
        # committed
        self._log_id = ""
        self._head_seq = -1
        self._head_hash = GENESIS
        self._files: list[_LogFile] = []
        self._fd: int | None = None
        self._offset = 0
        self._file_records = 0
        self._tail_dirty = False
        # pending (sealed, not yet durable)
        self._pending: list[_Pending] = []
        self._carry: list[Draft] = []  # the log's own records to write again after a failure
        self._reset_pending()

    # ----------------------------------------------------------------- public

    @property
    def log_id(self) -> str:
        return self._log_id

    @property
    def head(self) -> tuple[int, str]:
        """(seq, hash) of the last durable record."""
        return self._head_seq, self._head_hash

    @property
    def current_file(self) -> Path | None:
        return self._files[-1].path if self._files and self._fd is not None else None

    @property
    def pending(self) -> int:
        return len(self._pending)

    def add_listener(self, listener: Listener) -> None:
        """`listener(state, reason)` is called on every change of `state` (writer's thread)."""
        self._listeners.append(listener)

    def now(self) -> str:
        return format_time(self._clock())

    def _reset_pending(self) -> None:
        self._pending = []
        self._pend_seq = self._head_seq + 1
        self._pend_hash = self._head_hash
        self._pend_size = self._offset
        self._pend_records = self._file_records
        self._pend_files = list(self._files)
        self._pend_has_file = self._fd is not None
        self._resume_sealed = False
